"""Shapley-guided pruning (beyond the paper): keep the K layers with the highest Shapley values.

The paper computes per-layer Shapley values only to describe adapters. Acting on them: when memory
or latency allow only K of the adapter's layers, keep the K whose values are highest. The values are
estimated on a validation split carved from the training pool (held-out training examples, never
the test split), and the choice is compared on the test split with the fixed schemes at the same K
(every other, low, middle, high, generalised to any K by `copra.adapters.prune.fixed_subset`) and with random
K-subsets. Does CopRA's fairer credit make the choice safer? The table answers per method.

Kept subsets are evaluated through the gates (`CoalitionEvaluator`, all subsets of one adapter in one
prefix-sharing pass): for LoRA, a gated-off layer and a layer with zeroed A/B give the same outputs
(tests pin that the accuracy equals the one of the pruned adapter).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from copra.adapters.prune import KEEP_SCHEMES, check_k, fixed_subset, top_k
from copra.core.config import TrainConfig, make_config
from copra.experiments.runner.common import Evaluator, load_for_eval, mean_std
from copra.models.evaluation import FewShotData, prepare_validation
from copra.utils.errors import UserError


def adapter_values(
    folder: str | Path,
    base: TrainConfig,
    evaluator: Evaluator,
    *,
    granularity: str = "layer",
    samples: int = 64,
    metric: str = "accuracy",
    validation: FewShotData | None = None,
):
    """(classifier with the adapter loaded, gates, Shapley values on the validation split of `base`'s seed).

    The caller removes the gates (`gates.remove()`) when done with the classifier.
    """
    from copra.analysis.coalitions import shapley_for_model
    from copra.core.gates import CopRA
    from copra.models.evaluation import load_adapter_state

    state, adapter_config = load_for_eval(folder, task=base.task)
    validation = validation or prepare_validation(base, base.eval_examples)
    classifier = evaluator.classifier(adapter_config, str(folder))
    classifier.set_prompts(list(validation.prompts))
    load_adapter_state(classifier, state)
    gates = CopRA(classifier.encoder, total_steps=1, granularity=granularity)
    try:
        return (
            classifier,
            gates,
            shapley_for_model(classifier, gates, validation, "multilinear", samples, metric=metric),
        )
    except BaseException:
        gates.remove()
        raise


def auto_values(
    folder: str | Path, task: str, granularity: str = "layer", samples: int = 64, examples: int | None = None
) -> tuple[list[str], list[float]]:
    """For `copra prune --keep-by-shapley auto --task T`: values on a validation split of T's training pool.

    The run's settings (model, shots, seed, ...) come from the adapter's copra.json when it has one,
    so the split leaves out exactly the examples the adapter was trained on.
    """
    from copra.adapters.io import read_metadata
    from copra.core.config import TrainConfig

    try:
        meta = read_metadata(folder)
    except ValueError as error:
        raise UserError(f"{Path(folder) / 'copra.json'}: not valid JSON ({error})") from None
    fields = set(TrainConfig.__dataclass_fields__)
    stored = {k: v for k, v in (meta.get("config") or {}).items() if k in fields}
    base = make_config(stored | {"task": task, "progress": False})
    _, gates, result = adapter_values(
        folder,
        base,
        Evaluator(base),
        granularity=granularity,
        samples=samples,
        validation=prepare_validation(base, examples or base.eval_examples),
    )
    gates.remove()
    return list(result.players), [float(v) for v in result.values]


def random_subsets(n: int, k: int, count: int, seed: int) -> list[list[int]]:
    """`count` distinct k-subsets of range(n) (all of them when there are no more), seeded."""
    if math.comb(n, k) <= count:
        return [list(c) for c in itertools.combinations(range(n), k)]
    rng, chosen = np.random.default_rng(seed), set()
    while len(chosen) < count:
        chosen.add(tuple(sorted(rng.choice(n, size=k, replace=False).tolist())))
    return [list(c) for c in sorted(chosen)]


def keep_k_run(
    folder: str,
    seed: int,
    test: FewShotData,
    base: TrainConfig,
    evaluator: Evaluator,
    keep: list[int],
    subsets: int,
    samples: int,
    examples: int,
) -> dict[str, Any]:
    """One adapter: values on its validation split, then test accuracy of every kept subset for every K."""
    from copra.analysis.coalitions import CoalitionEvaluator

    run_config = base.replace(seed=seed)
    classifier, gates, values = adapter_values(
        folder,
        run_config,
        evaluator,
        samples=samples,
        validation=prepare_validation(run_config, examples or run_config.eval_examples),
    )
    try:
        n = len(values.players)
        plan: dict[tuple[str, int], list[list[int]]] = {}
        for k in keep:
            check_k(k, n)
            plan["shapley", k] = [top_k(values.values, k)]
            for scheme in KEEP_SCHEMES:
                plan[scheme, k] = [fixed_subset(scheme, n, k)]
            plan["random", k] = random_subsets(n, k, subsets, seed=1000 * seed + k)
        masks = {tuple(i in subset for i in range(n)) for subsets_ in plan.values() for subset in subsets_}
        order = sorted(masks)
        classifier.set_prompts(list(test.prompts))
        scores = dict(zip(order, CoalitionEvaluator(classifier, gates, test).values(np.array(order, dtype=bool))))
    finally:
        gates.remove()
    acc = lambda subset: float(scores[tuple(i in subset for i in range(n))])  # noqa: E731
    by_k = {}
    for k in keep:
        row = {name: acc(plan[name, k][0]) for name in ("shapley", *KEEP_SCHEMES)}
        row["kept"] = plan["shapley", k][0]
        row["random"] = [acc(s) for s in plan["random", k]]
        row["random_kept"] = plan["random", k]
        row["random_mean"] = float(np.mean(row["random"]))
        by_k[str(k)] = row
    return {
        "folder": folder,
        "seed": seed,
        "players": list(values.players),
        "values": values.values.tolist(),
        "stderr": values.stderr.tolist(),
        "estimator": values.method,
        "by_k": by_k,
    }


def keep_by_shapley(
    adapters: dict[str, list[str]],
    test: FewShotData,
    base: TrainConfig,
    evaluator: Evaluator,
    keep: list[int],
    subsets: int,
    samples: int,
    examples: int,
) -> dict[str, Any]:
    """Every method's adapters through `keep_k_run`, with per-K means over adapters (and the best fixed scheme)."""
    from copra.adapters.io import read_metadata

    out: dict[str, Any] = {
        "keep": list(keep),
        "random_subsets": subsets,
        "validation_examples": examples,
        "methods": {},
    }
    for method, folders in adapters.items():
        runs = [
            keep_k_run(
                f,
                int(read_metadata(f).get("seed", base.seed)),
                test,
                base,
                evaluator,
                keep,
                subsets,
                samples,
                examples,
            )
            for f in folders
        ]
        summary = {}
        for k in map(str, keep):
            column = lambda name: [r["by_k"][k][name] for r in runs]  # noqa: E731
            best = max(KEEP_SCHEMES, key=lambda s: (np.mean(column(s)), -KEEP_SCHEMES.index(s)))
            summary[k] = {
                name: dict(zip(("mean", "std"), mean_std(column(key)))) | {"values": column(key)}
                for name, key in (("shapley", "shapley"), ("best_fixed", best), ("random", "random_mean"))
            }
            summary[k]["best_fixed"]["scheme"] = best
        out["methods"][method] = {"runs": runs, "summary": summary}
    return out


def render_rows(table: dict[str, Any]) -> list[str]:
    """Markdown: accuracy after keeping K players, by Shapley vs the best fixed scheme vs random subsets."""
    methods = list(table["methods"])
    lines = [
        f"### Keeping K layers by Shapley value (values on {table['validation_examples']} held-out training "
        f"examples; random: mean of {table['random_subsets']} subsets; best fixed: best mean on test)",
        "",
        "| K | " + " | ".join(f"{m} Shapley | {m} best fixed | {m} random" for m in methods) + " |",
        "|---|" + "---|" * 3 * len(methods),
    ]
    for k in map(str, table["keep"]):
        cells = []
        for m in methods:
            row = table["methods"][m]["summary"][k]
            cells += [
                f"{100 * row['shapley']['mean']:.1f} ± {100 * row['shapley']['std']:.1f}",
                f"{100 * row['best_fixed']['mean']:.1f} ({row['best_fixed']['scheme']})",
                f"{100 * row['random']['mean']:.1f} ± {100 * row['random']['std']:.1f}",
            ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    for m in methods:
        rows = table["methods"][m]["summary"]
        lost = {
            other: [k for k in map(str, table["keep"]) if rows[k]["shapley"]["mean"] < rows[k][other]["mean"]]
            for other in ("best_fixed", "random")
        }
        lines.append(
            f"- {m}: Shapley-guided keeping is below the best fixed scheme at K = "
            f"{', '.join(lost['best_fixed']) or 'none'} and below the random mean at K = "
            f"{', '.join(lost['random']) or 'none'}."
        )
    return lines + [""]


def plot_panel(table: dict[str, Any], axes) -> None:
    """Accuracy vs K: Shapley (solid), best fixed (dotted), random mean (dashed), one colour per method."""
    ks = table["keep"]
    for i, (method, entry) in enumerate(table["methods"].items()):
        colour = f"C{i}"
        for name, style in (("shapley", "-"), ("best_fixed", ":"), ("random", "--")):
            rows = [entry["summary"][str(k)][name] for k in ks]
            axes.errorbar(
                ks,
                [100 * r["mean"] for r in rows],
                yerr=[100 * r["std"] for r in rows],
                color=colour,
                linestyle=style,
                marker="o" if name == "shapley" else None,
                capsize=2,
                label=f"{method} {name.replace('_', ' ')}",
            )
    axes.set_xticks(ks)
    axes.set_xlabel("layers kept (K)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("keep K layers: Shapley vs fixed vs random")
    axes.legend(fontsize=6)
