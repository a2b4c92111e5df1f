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
        out |= {k + unit: abs(sign) * v for k, v in mean.items()}
        out["barrier" + unit] = sign * (mean["own"] - mean["fused"])
        out["averaging" + unit] = sign * (mean["own"] - mean["mixture"])
        out["misalignment" + unit] = sign * (mean["mixture"] - mean["fused"])
        out["shrinkage" + unit] = sign * (mean["own"] - mean["fused_share"])
    scales = [s["scale"] for s in per_seed if s["scale"] is not None]
    if scales:
        out["scale"] = statistics.fmean(scales)
    return out
