"""Accuracy landscape of merged adapters over the interpolation coefficient (CopRA paper, Fig. 3).

Paper: Zhuang et al., "CopRA: A Progressive LoRA Training Strategy" (2024), Sec. 3.1 and Fig. 3. Two
adapters of the same task, trained from different seeds, are merged at alpha in {0, 0.1, ..., 1}:

    Fusion   dW_f = (a B1 + (1-a) B2)(a A1 + (1-a) A2)      Mixture  dW_m = a B1 A1 + (1-a) B2 A2

Why: CopRA's claim is linear mode connectivity -- its adapters can be fused at any alpha without the
accuracy dip plain LoRA shows in the middle -- and LoRA Align (LA) re-factors adapter 2 as
(B2 P, P^-1 A2) to shrink D_upper = a(1-a)(||B1 - B2 P||_2 + ||A1 - P^-1 A2||_2), closing the gap
between fusion and mixture. alpha = 1 is adapter 1 (the first seed of a pair), alpha = 0 adapter 2.

Evaluation: one classifier per LoRA shape, reused for every point (`common.Evaluator`). A mixture is
an exact rank-2r adapter (`copra.adapters.merge.mixture`), which a rank-r model cannot hold, so it is evaluated
in a second classifier built from `mixture_config` (r -> 2r, lora_alpha -> 2 alpha, or sqrt(2) alpha
with rsLoRA, so the scaling is unchanged). That is exactly the model PEFT builds when it loads the
saved mixture folder, and it reuses the library's own `mixture`. PEFT's combination types (ties,
dare_ties, svd, ...) are further `merge_methods`, computed by PEFT's `add_weighted_adapter` through
`copra.adapters.peft_merge.merge_states` and evaluated with the config PEFT gives the merged adapter.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from copra.adapters.align import align, bound
from copra.adapters.io import finite_or_none
from copra.adapters.merge import check_compatible, delta_weights, fusion, mixture
from copra.adapters.peft_merge import MERGE_METHODS, merge_states, setting_options
from copra.core.config import METHODS, PerMethodLR, TrainConfig, check_lrs
from copra.experiments.runner.common import (
    Evaluator,
    RunExecution,
    TrainingBudget,
    barrier,
    budget_config,
    check_overrides,
    check_unique,
    load_for_eval,
    mean_std,
    new_axes,
    save_figure,
    write_outputs,
)
from copra.experiments.runner.diagnostics import pair_diagnostics, summarise
from copra.experiments.runner.runs import run_all
from copra.models.evaluation import FewShotData, prepare_data
from copra.utils.errors import UserError

ALPHAS = [round(i / 10, 1) for i in range(11)]


@dataclass
class LandscapeConfig(TrainingBudget, RunExecution, PerMethodLR):
    """Settings of the merging landscape (paper Fig. 3): which adapters, which merges, which alphas."""

    task: str = "bbc_news"  #: task whose same-task adapters are merged
    methods: list[str] = field(default_factory=lambda: ["lora", "copra"])  #: training methods compared
    seeds: list[int] = field(default_factory=lambda: [0, 1])  #: one adapter per seed; pairs are consecutive seeds
    alphas: list[float] = field(default_factory=lambda: list(ALPHAS))  #: interpolation coefficients in [0, 1]
    #: merge methods evaluated, one curve each: fusion, mixture, or PEFT's ties, dare_ties, ... (merge_method elsewhere)
    merge_methods: list[str] = field(default_factory=lambda: ["fusion", "mixture"])
    merge_density: float = 0.5  #: density of TIES / DARE / magnitude merges (unused by the other methods)
    align: bool = True  #: also fuse after LoRA Align (curves "lora+align/fusion", "copra+align/fusion")
    align_steps: int = 200  #: Adam steps of LoRA Align per module
    diagnostics: bool = (
        True  #: also each pair's merge controls at 1/2 (mixture, shrinkage, cross-entropy; runner.diagnostics)
    )
    lrs: dict[str, float] = field(default_factory=dict)  #: peak lr per method (e.g. from lr_select); others use lr
    output_dir: str = "results/landscape"  #: where adapters, JSON, PNG and Markdown go

    def __post_init__(self) -> None:
        check_unique("methods", self.methods, METHODS)
        check_unique("merge_methods", self.merge_methods, MERGE_METHODS)
        for merger in self.merge_methods:
            setting_options(merger, self.merge_density)
        check_unique("seeds", self.seeds, minimum=2)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise UserError(f"seeds must be integers, got {self.seeds!r}")
        check_unique("alphas", self.alphas)
        for a in self.alphas:
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not (math.isfinite(a) and 0 <= a <= 1):
                raise UserError(f"every alpha must be a number in [0, 1], got {a!r}")
        self.alphas = sorted(float(a) for a in self.alphas)
        if not isinstance(self.align, bool):
            raise UserError(f"align must be true or false, got {self.align!r}")
        if isinstance(self.align_steps, bool) or not isinstance(self.align_steps, int) or self.align_steps < 0:
            raise UserError(f"align_steps must be a non-negative integer, got {self.align_steps!r}")
        if not isinstance(self.diagnostics, bool):
            raise UserError(f"diagnostics must be true or false, got {self.diagnostics!r}")
        check_overrides(self.overrides)
        check_lrs(self.lrs, self.methods)
        self.run_config(self.methods[0], self.seeds[0])  # validates every TrainConfig field

    def run_config(self, method: str, seed: int) -> TrainConfig:
        return budget_config(self, task=self.task, method=method, seed=seed, lr=self.lr_of(method))

    def pairs(self) -> list[tuple[int, int]]:
        """Consecutive seeds: [0, 1, 2] -> (0, 1), (1, 2)."""
        return list(zip(self.seeds, self.seeds[1:]))


def run(config: LandscapeConfig) -> dict:
    """Train one adapter per (method, seed), then evaluate every merge curve; writes the outputs."""
    out = Path(config.output_dir)
    data = prepare_data(config.run_config(config.methods[0], config.seeds[0]))  # fails early on a bad task
    keys = [(m, s) for m in config.methods for s in config.seeds]
    plan = [(config.run_config(m, s), out / "runs" / m / f"seed{s}") for m, s in keys]
    results = run_all(plan, config.jobs, config.executor, config.ray_address)
    folders = {key: result.adapter_dir for key, result in zip(keys, results)}
    pairs = {m: [(folders[m, a], folders[m, b]) for a, b in config.pairs()] for m in config.methods}
    return run_from_adapters(pairs, config, data)


def gap(a1: dict, a2: dict, alpha: float = 0.5) -> float:
    """Measured sum over modules of ||dW_f - dW_m||_2 (unscaled B A) at `alpha`."""
    f, m = delta_weights(fusion([a1, a2], [alpha, 1 - alpha])), delta_weights(mixture([a1, a2], [alpha, 1 - alpha]))
    return sum(float(torch.linalg.matrix_norm(f[k].double() - m[k].double(), ord=2)) for k in f)


def run_from_adapters(
    pairs: dict[str, list[tuple[str, str]]], config: LandscapeConfig, data: FewShotData | None = None
) -> dict:
    """Evaluate the landscape of given adapter folder pairs {method: [(folder 1, folder 2), ...]}."""
    started = time.perf_counter()
    if not pairs or any(not p for p in pairs.values()):
        raise UserError("run_from_adapters needs at least one (folder, folder) pair per method")
    base = config.run_config(next(iter(pairs)), config.seeds[0])
    loaded: dict[str, tuple[dict, dict]] = {}
    for method, plist in pairs.items():
        for pair in plist:
            if len(pair) != 2:
                raise UserError(f"{method}: a pair needs exactly two adapter folders, got {pair!r}")
            for folder in pair:
                if str(folder) not in loaded:
                    loaded[str(folder)] = load_for_eval(folder, config.task, config.model)
            (sa, ca), (sb, cb) = loaded[str(pair[0])], loaded[str(pair[1])]
            try:
                check_compatible([sa, sb], [ca, cb])
            except UserError as error:
                raise UserError(f"{pair[0]} and {pair[1]} cannot be merged: {error}") from None
    data = data or prepare_data(base)
    evaluator = Evaluator(base)
    alphas = config.alphas
    n_curves = len(config.merge_methods) + int(config.align)
    bar = tqdm(
        total=sum(len(p) for p in pairs.values()) * (2 + n_curves * len(alphas)),
        disable=not config.progress,
        desc=f"landscape {config.task}",
        leave=False,
    )
    summary: dict[str, Any] = {
        "config": asdict(config),
        "task": data.task,
        "alphas": alphas,
        "methods": {},
        "curves": {},
    }
    for method, plist in pairs.items():
        row = summary["methods"][method] = {"pairs": [list(map(str, p)) for p in plist], "inputs": [], "bounds": []}
        for folder_a, folder_b in plist:
            (sa, ca), (sb, cb) = loaded[str(folder_a)], loaded[str(folder_b)]
            row["inputs"].append(
                {"alpha_1": evaluator.accuracy(sa, ca, data), "alpha_0": evaluator.accuracy(sb, cb, data)}
            )
            bar.update(2)
            variants = [(f"{method}/{m}", m, False, sb) for m in config.merge_methods]
            bounds = {"before": bound(sa, sb), "gap_before": gap(sa, sb)}
            if config.align:
                aligned = align(sa, sb, steps=config.align_steps)
                variants.append((f"{method}+align/fusion", "fusion", True, aligned))
                bounds.update(after=bound(sa, aligned), gap_after=gap(sa, aligned))
            row["bounds"].append(bounds)
            if config.diagnostics:
                row.setdefault("diagnostics", []).append(pair_diagnostics(evaluator, data, [(sa, ca), (sb, cb)]))
            for name, merger, aligned_flag, other in variants:
                accs = []
                for alpha in alphas:
                    merged, merged_config = merge_states(
                        merger,
                        [sa, other],
                        [ca, cb],
                        [alpha, 1 - alpha],
                        **setting_options(merger, config.merge_density),
                    )
                    accs.append(evaluator.accuracy(merged, merged_config, data))
                    bar.update(1)
                curve = summary["curves"].setdefault(
                    name, {"method": method, "merger": merger, "align": aligned_flag, "accuracy": []}
                )
                curve["accuracy"].append(accs)
    bar.close()
    for curve in summary["curves"].values():
        columns = list(zip(*curve["accuracy"]))
        curve["mean"] = [mean_std(c)[0] for c in columns]
        curve["std"] = [mean_std(c)[1] for c in columns]
        curve["barrier"] = mean_std(barrier(accs, alphas) for accs in curve["accuracy"])[0]
    for row in summary["methods"].values():
        row["bound"] = {k: finite_or_none(mean_std(b[k] for b in row["bounds"])[0]) for k in row["bounds"][0]}
        if "diagnostics" in row:
            per_pair = [summarise(d) for d in row["diagnostics"]]
            row["diagnosis"] = {k: mean_std(p[k] for p in per_pair)[0] for k in per_pair[0]}
    summary["classifiers_built"] = evaluator.builds
    summary["wall_seconds"] = time.perf_counter() - started
    out = Path(config.output_dir)
    write_outputs(out, "landscape", summary, plot, render)
    return summary


STYLES = {"fusion": "-", "mixture": "--"}


def plot(summary: dict, path: str | Path) -> Path:
    """Accuracy (%) vs alpha, one line per method/merger, a mean ± std band when there are several pairs."""
    figure, ax = new_axes()
    alphas = summary["alphas"]
    colours = {}
    for name, curve in summary["curves"].items():
        colour = colours.setdefault(curve["method"], f"C{len(colours)}")
        mean = [100 * v for v in curve["mean"]]
        ax.plot(
            alphas,
            mean,
            ":" if curve["align"] else STYLES.get(curve["merger"], "-."),
            color=colour,
            marker="o",
            markersize=3,
            label=name,
        )
        if len(curve["accuracy"]) > 1:
            ax.fill_between(
                alphas,
                [m - 100 * s for m, s in zip(mean, curve["std"])],
                [m + 100 * s for m, s in zip(mean, curve["std"])],
                color=colour,
                alpha=0.15,
            )
    ax.set_xlabel("alpha (1 = adapter of the first seed, 0 = of the second)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Merging two same-task adapters: {summary['task']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(figure, path)


def table(summary: dict) -> str:
    """Markdown: accuracy (%) of every curve at every alpha, mean over pairs, and its barrier."""
    alphas = summary["alphas"]
    lines = ["| curve | " + " | ".join(f"{a:g}" for a in alphas) + " | barrier |", "|---" * (len(alphas) + 2) + "|"]
    for name, curve in summary["curves"].items():
        cells = " | ".join(
            f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if len(curve["accuracy"]) > 1 else "")
            for m, s in zip(curve["mean"], curve["std"])
        )
        lines.append(f"| {name} | {cells} | {100 * curve['barrier']:.1f} |")
    return "\n".join(lines)


def diagnosis_table(summary: dict) -> list[str]:
    """Markdown lines: each method's barrier at 1/2 split into averaging and misalignment, or none."""
    rows = {m: r["diagnosis"] for m, r in summary["methods"].items() if "diagnosis" in r}
    if not rows:
        return []
    lines = [
        "Why fusion at 1/2 loses what it loses (accuracy in %, mean over pairs): barrier = single - fused = averaging "
        "(single - mixture) + misalignment (mixture - fused); shrinkage = single - single x 1/4 (its share in the "
        "fusion); CE: the same barrier in the labels' cross-entropy (nats).",
        "",
        "| method | zero-shot | single | fused | mixture | single x 1/4 | barrier | averaging | misalign. | shrinkage "
        "| CE barrier |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, d in rows.items():
        lines.append(
            f"| {method} | {d['zero_shot']:.1f} | {d['single']:.1f} | {d['fused']:.1f} | {d['mixture']:.1f} | "
            f"{d['fused_share']:.1f} | {d['barrier']:.1f} | {d['averaging']:.1f} | {d['misalignment']:.1f} | "
            f"{d['shrinkage']:.1f} | {d['barrier_ce']:.3f} |"
        )
    return [*lines, ""]


def render(summary: dict) -> str:
    c = summary["config"]
    bounds = ["| method | D_upper before LA | after LA | measured gap before | after |", "|---|---|---|---|---|"]
    for method, row in summary["methods"].items():
        b = row["bound"]
        cell = lambda k: "–" if b.get(k) is None else f"{b[k]:.4g}"  # noqa: E731
        bounds.append(
            f"| {method} | {cell('before')} | {cell('after')} | {cell('gap_before')} | {cell('gap_after')} |"
        )
    n_pairs = max(len(r["pairs"]) for r in summary["methods"].values())
    return "\n".join(
        [
            f"# Merging landscape on {summary['task']} (CopRA paper, Fig. 3)",
            "",
            f"Adapters of seeds {c['seeds']} ({n_pairs} consecutive pair(s)), {c['shots']} shots, {c['steps']} steps, "
            f"model {c['model']}. Accuracy (%) on the fixed evaluation subset; alpha = 1 is the first adapter of a pair. "
            "Fusion averages the factors, mixture the updates (exact, rank 2r); `+align` fuses after LoRA Align. "
            "Barrier: largest drop below the straight line between the endpoints.",
            "",
            table(summary),
            "",
            "Bound at alpha = 0.5 (sum over modules, spectral norms; measured gap = sum ||dW_f - dW_m||_2, unscaled):",
            "",
            "\n".join(bounds),
            "",
            *diagnosis_table(summary),
            "![landscape](landscape.png)",
            "",
        ]
    )
