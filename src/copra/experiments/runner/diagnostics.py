"""Merge diagnostics: why a merge of two adapters loses what it loses (issue 23).

A fused pair's accuracy alone cannot say whether LoRA's merges *break*. Fusing adapters 1 and 2 at 1/2

    (B1 + B2)/2 (A1 + A2)/2 = (B1 A1 + B2 A2)/4 + (B1 A2 + B2 A1)/4

keeps a quarter of each adapter's own update (shrinkage) and adds two cross terms, which help when the
seeds agree and hurt when they do not (misalignment). So every merge is scored beside its controls:

- **single**: each adapter alone;
- **mixture**: the exact average (B1 A1 + B2 A2)/2 (no cross terms, rank 2r);
- **shrinkage control**: each adapter with its update scaled to its share in the merge (x1/4 for a
  fused pair, x1/2 for a mixture);

and the barrier (mean single of the pair minus fused) splits into averaging (single minus mixture: two
different functions averaged) plus misalignment (mixture minus fused: what the cross terms cost).
Each is reported in accuracy and in the cross-entropy of the labels, which moves before the argmax does.
Per-example correctness is kept (as a 0/1 string) so paired bootstraps can resample examples.
The same controls for N adapters: `task_merge_diagnostics` (N task adapters fused at 1/N) and
`client_merge_diagnostics` (a federated run's N clients fused at n_i / N, `copra federated`).
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from typing import Any

from copra.adapters.merge import fusion, mixture, mixture_config, scale_update
from copra.experiments.runner.common import Adapter, Evaluator, zero_b
from copra.models.evaluation import FewShotData, Scored

FUSED_SHARE = 0.25  # each adapter's own update in a fused pair at 1/2: (B/2)(A/2)
MIXTURE_SHARE = 0.5  # ... in a mixture at 1/2


def outcome(scored: Scored) -> dict[str, Any]:
    """One evaluation as JSON: accuracy, mean cross-entropy, and the per-example 0/1 string."""
    return {
        "accuracy": scored.accuracy,
        "cross_entropy": scored.cross_entropy,
        "correct": "".join("1" if c else "0" for c in scored.correct.tolist()),
    }


def pair_diagnostics(
    evaluator: Evaluator, data: FewShotData, adapters: Sequence[tuple[Adapter, dict]]
) -> dict[str, Any]:
    """Single, shrinkage controls, and every pair's fusion and mixture at 1/2, on `data`'s evaluation set."""
    state0, config0 = adapters[0]
    out: dict[str, Any] = {
        "zero_shot": outcome(evaluator.scored(zero_b(state0), config0, data)),
        "single": [outcome(evaluator.scored(s, c, data)) for s, c in adapters],
        "fused_share": [outcome(evaluator.scored(scale_update(s, FUSED_SHARE), c, data)) for s, c in adapters],
        "mixture_share": [outcome(evaluator.scored(scale_update(s, MIXTURE_SHARE), c, data)) for s, c in adapters],
        "pairs": [],
    }
    for i, j in itertools.combinations(range(len(adapters)), 2):
        pair = [adapters[i][0], adapters[j][0]]
        out["pairs"].append(
            {
                "members": [i, j],
                "fused": outcome(evaluator.scored(fusion(pair, [0.5, 0.5]), config0, data)),
                "mixture": outcome(evaluator.scored(mixture(pair, [0.5, 0.5]), mixture_config(config0, 2), data)),
            }
        )
    return out


def summarise(diagnostics: dict[str, Any]) -> dict[str, float]:
    """Means over seeds and pairs, in points (accuracy x 100) and nats; a barrier > 0 is a loss."""
    mean = statistics.fmean
    single, pairs = diagnostics["single"], diagnostics["pairs"]

    def pair_single(p: dict, key: str) -> float:
        return mean(single[m][key] for m in p["members"])

    out = {"zero_shot": 100 * diagnostics["zero_shot"]["accuracy"]}
    for key, unit, sign in (("accuracy", "", 100.0), ("cross_entropy", "_ce", -1.0)):
        out["single" + unit] = abs(sign) * mean(s[key] for s in single)
        out["fused" + unit] = abs(sign) * mean(p["fused"][key] for p in pairs)
        out["mixture" + unit] = abs(sign) * mean(p["mixture"][key] for p in pairs)
        out["fused_share" + unit] = abs(sign) * mean(s[key] for s in diagnostics["fused_share"])
        # losses are positive: single - merged for accuracy, merged - single for cross-entropy
        out["barrier" + unit] = sign * mean(pair_single(p, key) - p["fused"][key] for p in pairs)
        out["averaging" + unit] = sign * mean(pair_single(p, key) - p["mixture"][key] for p in pairs)
        out["misalignment" + unit] = sign * mean(p["mixture"][key] - p["fused"][key] for p in pairs)
        out["shrinkage" + unit] = sign * mean(s[key] - f[key] for s, f in zip(single, diagnostics["fused_share"]))
    return out


def split(means: dict[str, float], own: str, unit: str = "", sign: float = 100.0) -> dict[str, float]:
    """An N-way merge's loss from the mean scores of its parts (`own`: the inputs alone), positive when lost:
    barrier = own - fused = averaging (own - mixture) + misalignment (mixture - fused); shrinkage = own -
    own at its share. `sign` -1 turns cross-entropies (lower is better) into losses."""
    return {
        "barrier" + unit: sign * (means[own] - means["fused"]),
        "averaging" + unit: sign * (means[own] - means["mixture"]),
        "misalignment" + unit: sign * (means["mixture"] - means["fused"]),
        "shrinkage" + unit: sign * (means[own] - means["fused_share"]),
    }


def task_merge_diagnostics(
    evaluator: Evaluator,
    data: dict[str, FewShotData],
    states: dict[str, tuple[Adapter, dict]],
    scales: Sequence[float] = (),
    validation: dict[str, FewShotData] | None = None,
) -> dict[str, Any]:
    """One seed's N task adapters {task: (state, config)}: the controls of their fusion at 1/N, on every task.

    Per task: its own adapter; the fusion and the exact mixture at 1/N; its own adapter at its share in
    each (1/N^2 fused, 1/N mixed: the shrinkage controls). With `scales` and `validation`, also the
    fusion with its update multiplied by the lambda of `scales` whose mean validation accuracy over the
    tasks is best (task-arithmetic scaling; MTL15's fusion at 1/15 keeps 1/225 of each update).
    """
    tasks, n = list(states), len(states)
    parts, config0 = [states[t][0] for t in tasks], states[tasks[0]][1]
    fused, mixed = fusion(parts, [1 / n] * n), mixture(parts, [1 / n] * n)
    mixed_config = mixture_config(config0, n)
    scale = None
    if scales and validation is not None:
        scale = max(
            scales,
            key=lambda s: statistics.fmean(
                evaluator.scored(scale_update(fused, s), config0, validation[t]).accuracy for t in tasks
            ),
        )
    out: dict[str, Any] = {"scale": scale, "tasks": {}}
    for task in tasks:
        state, config = states[task]
        row = out["tasks"][task] = {
            "own": outcome(evaluator.scored(state, config, data[task])),
            "fused": outcome(evaluator.scored(fused, config0, data[task])),
            "mixture": outcome(evaluator.scored(mixed, mixed_config, data[task])),
            "fused_share": outcome(evaluator.scored(scale_update(state, 1 / n**2), config, data[task])),
            "mixture_share": outcome(evaluator.scored(scale_update(state, 1 / n), config, data[task])),
        }
        if scale is not None:
            row["scaled"] = outcome(evaluator.scored(scale_update(fused, scale), config0, data[task]))
    return out


def summarise_tasks(per_seed: Sequence[dict[str, Any]]) -> dict[str, float]:
    """`task_merge_diagnostics` of every seed, as means over seeds and tasks in points (and nats, `_ce`).

    barrier = own - fused = averaging (own - mixture: the tasks' updates interfere) + misalignment
    (mixture - fused: the cross terms B_s A_t); shrinkage = own - own at 1/N^2.
    """
    rows = [row for seed in per_seed for row in seed["tasks"].values()]
    kinds = ["own", "fused", "mixture", "fused_share", "mixture_share"] + (["scaled"] if "scaled" in rows[0] else [])
    out: dict[str, float] = {}
    for key, unit, sign in (("accuracy", "", 100.0), ("cross_entropy", "_ce", -1.0)):
        mean = {k: statistics.fmean(r[k][key] for r in rows) for k in kinds}
        out |= {k + unit: abs(sign) * v for k, v in mean.items()} | split(mean, "own", unit, sign)
    scales = [s["scale"] for s in per_seed if s["scale"] is not None]
    if scales:
        out["scale"] = statistics.fmean(scales)
    return out


def client_merge_diagnostics(
    evaluator: Evaluator,
    data: FewShotData,
    clients: Sequence[Adapter],
    weights: Sequence[float],
    adapter_config: dict,
    scales: Sequence[float] = (),
    validation: FewShotData | None = None,
) -> dict[str, Any]:
    """A federated run's last merge: N client adapters fused at weights w_i (n_i / N), beside its controls.

    Scored on `data`'s evaluation set: each client's own adapter; the fusion; the exact mixture
    sum_i w_i B_i A_i (rank N r); each client with its update x w_i^2, its own term in the fusion
    (B_f A_f = sum_ij w_i w_j B_i A_j: shrinkage control). With `scales` and `validation` (drawn from the
    training pool, never the test split), also the fusion's update x lambda, lambda the scale of best
    validation accuracy (ties, common on a few hundred examples: the lower cross-entropy), and every
    scale's validation accuracy and cross-entropy.
    """
    n, fused = len(clients), fusion(clients, weights)
    out: dict[str, Any] = {"weights": list(weights), "scale": None, "validation": {}}
    if scales and validation is not None:
        for s in scales:
            scored = evaluator.scored(scale_update(fused, s), adapter_config, validation)
            out["validation"][str(s)] = {"accuracy": scored.accuracy, "cross_entropy": scored.cross_entropy}
        by = out["validation"]
        out["scale"] = max(scales, key=lambda s: (by[str(s)]["accuracy"], -by[str(s)]["cross_entropy"]))
    out |= {
        "clients": [outcome(evaluator.scored(s, adapter_config, data)) for s in clients],
        "fused": outcome(evaluator.scored(fused, adapter_config, data)),
        "mixture": outcome(evaluator.scored(mixture(clients, weights), mixture_config(adapter_config, n), data)),
        "fused_share": [
            outcome(evaluator.scored(scale_update(s, w * w), adapter_config, data)) for s, w in zip(clients, weights)
        ],
    }
    if out["scale"] is not None:
        out["scaled"] = outcome(evaluator.scored(scale_update(fused, out["scale"]), adapter_config, data))
    return out


def summarise_clients(per_seed: Sequence[dict[str, Any]]) -> dict[str, float]:
    """`client_merge_diagnostics` of every seed as means over seeds, in points (and nats, `_ce`).

    barrier = mean client - fused = averaging (mean client - mixture: the clients' functions differ) +
    misalignment (mixture - fused: the cross terms w_i w_j B_i A_j); shrinkage = mean client - mean
    client x w_i^2. Cross-entropy rows are losses too: merged - client.
    """
    mean = statistics.fmean
    out: dict[str, float] = {}
    for key, unit, sign in (("accuracy", "", 100.0), ("cross_entropy", "_ce", -1.0)):
        rows = {
            "client": [mean(c[key] for c in d["clients"]) for d in per_seed],
            "fused": [d["fused"][key] for d in per_seed],
            "mixture": [d["mixture"][key] for d in per_seed],
            "fused_share": [mean(c[key] for c in d["fused_share"]) for d in per_seed],
        }
        if all("scaled" in d for d in per_seed):
            rows["scaled"] = [d["scaled"][key] for d in per_seed]
        m = {k: mean(v) for k, v in rows.items()}
        out |= {k + unit: abs(sign) * v for k, v in m.items()} | split(m, "client", unit, sign)
    scales = [d["scale"] for d in per_seed if d["scale"] is not None]
    if scales:
        out["scale"] = mean(scales)
    return out
