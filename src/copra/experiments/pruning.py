"""Pruning experiment (paper Sec. 3.2, Fig. 4): LoRA vs CopRA vs Early CopRA under pruning.

Structured: drop the adapters of whole layers (every other, keep only the low / middle / high third)
or keep one attention projection (q / k / v). Unstructured: zero the smallest-magnitude fraction of
A and B entries. The paper's claim: CopRA's layers each work on their own (they were trained in
random sub-teams), so CopRA loses less accuracy when parts of the adapter are removed; the early
checkpoint (T/4) shows it most.

Beyond the paper, the scheme `shapley` keeps the K layers with the highest Shapley values (estimated
on a validation split of the training pool) for every K in `keep`, next to the fixed schemes at the
same K and random K-subsets (copra.experiments.shapley_pruning).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from copra.adapters.prune import PROJECTIONS, STRUCTURED, magnitude, projections, structured
from copra.core.config import PerMethodLR, check_lrs
from copra.experiments.runner.common import (
    Evaluator,
    RunExecution,
    TrainingBudget,
    budget_config,
    check_overrides,
    check_unique,
    load_for_eval,
    mean_std,
    save_figure,
    write_outputs,
    zoom_bars,
)
from copra.models.evaluation import FewShotData, prepare_data
from copra.utils.errors import UserError

METHODS = ("lora", "copra", "early_copra")
SCHEMES = STRUCTURED + ("shapley",)


@dataclass
class PruningConfig(TrainingBudget, RunExecution, PerMethodLR):
    """Which adapters to prune and how."""

    task: str = "bbc_news"  #: task the adapters are trained and evaluated on
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  #: one adapter per seed and method
    lrs: dict[str, float] = field(
        default_factory=dict
    )  #: peak lr per method (lora, copra) (e.g. from lr_select); others use lr
    schemes: list[str] = field(
        default_factory=lambda: list(STRUCTURED)
    )  #: structured schemes ("all" = unpruned; add "shapley" for keep-K by Shapley)
    keep: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])  #: shapley scheme: numbers of layers kept
    random_subsets: int = 5  #: shapley scheme: random K-subsets compared per K
    validation_examples: int = 240  #: shapley scheme: held-out training examples the values are estimated on
    shapley_samples: int = 64  #: shapley scheme: multilinear samples (exact values when that budget covers 2^n)
    sparsities: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(10)])  #: unstructured
    output_dir: str = "results/pruning"  #: where JSON, PNG and Markdown go

    def __post_init__(self) -> None:
        unknown = [s for s in self.schemes if s not in SCHEMES]
        if unknown:
            raise UserError(f"unknown pruning scheme {unknown[0]!r}; choose from {list(SCHEMES)}")
        if "shapley" in self.schemes:
            check_unique("keep", self.keep)
            if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.keep):
                raise UserError(f"keep must list numbers of layers >= 1, got {self.keep!r}")
            for name in ("random_subsets", "validation_examples", "shapley_samples"):
                if getattr(self, name) < (4 if name == "shapley_samples" else 1):
                    raise UserError(
                        f"{name} must be a positive integer (shapley_samples >= 4), got {getattr(self, name)!r}"
                    )
        bad = [s for s in self.sparsities if not 0.0 <= s < 1.0]
        if bad:
            raise UserError(f"sparsity must be in [0, 1), got {bad[0]!r}")
        if not self.seeds:
            raise UserError("pruning needs at least one seed")
        check_overrides(self.overrides)
        check_lrs(self.lrs, ("lora", "copra"))
        self.base_config()  # validates every TrainConfig field

    def base_config(self):
        """The TrainConfig every run starts from."""
        return budget_config(self, task=self.task)

    def run_config(self, method: str, seed: int):
        """One trained run: CopRA's keep the Early CopRA checkpoint (pruned too), each method at its lr."""
        return self.base_config().replace(
            method=method, seed=seed, save_early=method == "copra", lr=self.lr_of(method)
        )


def evaluate_pruned(
    adapters: dict[str, list[str]], data: FewShotData, config: PruningConfig, evaluator: Evaluator
) -> dict:
    """Accuracy of every (method, adapter) under every scheme and sparsity; mean ± std over adapters."""
    structured_acc: dict[str, dict[str, list[float]]] = {}
    unstructured_acc: dict[str, dict[str, list[float]]] = {}
    for method, folders in adapters.items():
        structured_acc[method] = {s: [] for s in config.schemes}
        unstructured_acc[method] = {str(s): [] for s in config.sparsities}
        for folder in folders:
            state, adapter_config = load_for_eval(folder, task=data.task)
            present = projections(state)
            for scheme in config.schemes:
                if scheme == "shapley":
                    continue  # keep-K by Shapley value: see shapley_pruning.keep_by_shapley
                if scheme in PROJECTIONS and scheme not in present:
                    continue  # that projection has no adapter: nothing to keep
                structured_acc[method][scheme].append(
                    evaluator.accuracy(structured(state, scheme), adapter_config, data)
                )
            for sparsity in config.sparsities:
                pruned = magnitude(state, sparsity)
                unstructured_acc[method][str(sparsity)].append(evaluator.accuracy(pruned, adapter_config, data))
    summarise = lambda table: {
        m: {k: dict(zip(("mean", "std"), mean_std(v))) | {"values": v} for k, v in rows.items() if v}
        for m, rows in table.items()
    }
    return {"structured": summarise(structured_acc), "unstructured": summarise(unstructured_acc)}


def run(config: PruningConfig) -> dict:
    """Train LoRA and CopRA (keeping CopRA's early checkpoint), prune, evaluate, write results."""
    from copra.experiments.runner.runs import run_all

    base = config.base_config()
    data = prepare_data(base)  # validates the task before anything is written
    out = Path(config.output_dir)
    started = time.perf_counter()
    adapters: dict[str, list[str]] = {m: [] for m in METHODS}
    plan = [
        (config.run_config(method, seed), out / "runs" / method / f"seed{seed}")
        for seed in config.seeds
        for method in ("lora", "copra")
    ]
    for result in run_all(plan, config.jobs, config.executor, config.ray_address):
        adapters[result.config["method"]].append(result.adapter_dir)
        if result.early_dir:
            adapters["early_copra"].append(result.early_dir)
    return run_from_adapters(adapters, data, config, started=started)


def run_from_adapters(
    adapters: dict[str, list[str]], data: FewShotData, config: PruningConfig, started: float | None = None
) -> dict:
    """Prune and evaluate existing adapter folders ({method: [folder, ...]}); write JSON, PNG, Markdown."""
    started = started if started is not None else time.perf_counter()
    evaluator = Evaluator(config.base_config())
    results = {
        "config": asdict(config),
        "task": data.task,
        "adapters": adapters,
        **evaluate_pruned(adapters, data, config, evaluator),
    }
    if "shapley" in config.schemes:
        from copra.experiments.shapley_pruning import keep_by_shapley

        results["keep_by_shapley"] = keep_by_shapley(
            adapters,
            data,
            config.base_config(),
            evaluator,
            config.keep,
            config.random_subsets,
            config.shapley_samples,
            config.validation_examples,
        )
    results["wall_seconds"] = time.perf_counter() - started
    out = Path(config.output_dir)
    write_outputs(out, "pruning", results, plot, render)
    return results


def plot(results: dict, path: Path) -> Path:
    """`draw(results)` as a PNG at `path`."""
    return save_figure(draw(results), path, dpi=110)


def draw(results: dict):
    """Fig. 4: bars per structured scheme (left), accuracy vs sparsity (right); one colour per method."""
    from matplotlib.figure import Figure

    keep = results.get("keep_by_shapley")
    figure = Figure(figsize=(17 if keep else 12, 4), layout="constrained")
    panels = figure.subplots(1, 3 if keep else 2, gridspec_kw={"width_ratios": [3, 2, 2] if keep else [3, 2]})
    left, right = panels[:2]
    if keep:
        from copra.experiments.shapley_pruning import plot_panel

        plot_panel(keep, panels[2])
    methods = list(results["structured"])
    schemes = [s for s in results["config"]["schemes"] if any(s in results["structured"][m] for m in methods)]
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        rows = results["structured"][method]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j, s in enumerate(schemes) if s in rows]
        left.bar(
            xs,
            [100 * rows[s]["mean"] for s in schemes if s in rows],
            width,
            yerr=[100 * rows[s]["std"] for s in schemes if s in rows],
            label=method,
            capsize=2,
        )
        curve = results["unstructured"][method]
        keys = sorted(curve, key=float)
        right.errorbar(
            [float(k) for k in keys],
            [100 * curve[k]["mean"] for k in keys],
            yerr=[100 * curve[k]["std"] for k in keys],
            marker="o",
            label=method,
            capsize=2,
        )
    zoom_bars(left, [100 * row[s]["mean"] for row in results["structured"].values() for s in row])
    left.set_xticks(range(len(schemes)), schemes, rotation=30)
    left.set_ylabel("accuracy (%)")
    left.set_title("structured pruning (kept part)")
    left.legend()
    right.set_xlabel("sparsity (fraction of A/B entries zeroed)")
    right.set_ylabel("accuracy (%)")
    right.set_title("unstructured (magnitude) pruning")
    right.legend()
    return figure


def render(results: dict) -> str:
    """Markdown tables (accuracy %, mean ± std over seeds)."""
    methods = list(results["structured"])
    lines = [
        f"## Pruning ({results['task']}, paper Fig. 4)",
        "",
        "![pruning](pruning.png)",
        "",
        "| scheme | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for scheme in results["config"]["schemes"]:
        if scheme == "shapley":
            continue
        cells = [results["structured"][m].get(scheme) for m in methods]
        if any(cells):
            lines.append(
                f"| {scheme} | "
                + " | ".join(f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}" if c else "-" for c in cells)
                + " |"
            )
    lines += ["", "| sparsity | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for sparsity in results["config"]["sparsities"]:
        cells = [results["unstructured"][m][str(sparsity)] for m in methods]
        lines.append(
            f"| {sparsity} | " + " | ".join(f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}" for c in cells) + " |"
        )
    if results.get("keep_by_shapley"):
        from copra.experiments.shapley_pruning import render_rows

        lines += [""] + render_rows(results["keep_by_shapley"])
    return "\n".join(lines + ["", f"Wall time: {results['wall_seconds']:.0f} s.", ""])
