"""Per-layer Shapley values of trained adapters (paper Sec. 2.2, Fig. 2), LoRA vs CopRA side by side.

Each LoRA layer (transformer block) is a player; v(C) is the accuracy on the fixed evaluation set
with only C's adapters on. The paper estimates phi with Owen's multilinear extension (Eq. 3); with
6 layers the exact value (all 64 coalitions) is cheap too, so we report both and how far apart they
are. CopRA trains layers in random sub-teams, so its layers should each carry a fairer, positive share.

Finer players (beyond the paper; the authors' rebuttal did it for CLIP): `granularity: module` makes
every LoRA module a player (q, k, v of each block: 18 on MiniLM). 2^18 coalitions are too many for
exact values, so the sampler's standard errors are reported instead, and the plot is a heat map of
block x projection per method.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from copra.adapters.prune import projection_of
from copra.analysis.shapley import ESTIMATORS, affordable
from copra.core.config import METHODS, PerMethodLR, check_lrs
from copra.core.gates import GRANULARITIES, player_of
from copra.experiments.runner.common import (
    Evaluator,
    RunExecution,
    TrainingBudget,
    budget_config,
    check_overrides,
    check_unique,
    load_for_eval,
    new_axes,
    save_figure,
    write_outputs,
)
from copra.models.evaluation import FewShotData, prepare_data
from copra.utils.errors import UserError

LABELS = {"lora": "LoRA", "copra": "CopRA", "early_copra": "Early CopRA"}


@dataclass
class ShapleyConfig(TrainingBudget, RunExecution, PerMethodLR):
    """Which adapters, which estimator, how many samples."""

    task: str = "bbc_news"  #: task the adapters were trained and are evaluated on
    methods: list[str] = field(default_factory=lambda: ["lora", "copra"])  #: training methods compared
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  #: one adapter per seed and method
    estimator: str = "multilinear"  #: exact, permutation or multilinear (the paper's)
    samples: int = 64  #: sampled coalitions (multilinear) or permutations (permutation)
    compare_exact: bool = True  #: also compute exact values (when n <= 16) and report the estimator's max abs error
    granularity: str = "layer"  #: players: one per transformer block ("layer") or per LoRA module ("module")
    metric: str = "accuracy"  #: v(C): accuracy or neg_loss
    lrs: dict[str, float] = field(default_factory=dict)  #: peak lr per method (e.g. from lr_select); others use lr
    output_dir: str = "results/shapley"  #: where JSON, PNG and Markdown go

    def __post_init__(self) -> None:
        check_unique("methods", self.methods, METHODS)
        check_unique("seeds", self.seeds)
        if self.estimator not in ESTIMATORS:
            raise UserError(f"unknown estimator {self.estimator!r}; choose one of {list(ESTIMATORS)}")
        if self.metric not in ("accuracy", "neg_loss"):
            raise UserError(f"metric must be accuracy or neg_loss, got {self.metric!r}")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"granularity must be one of {list(GRANULARITIES)}, got {self.granularity!r}")
        if self.samples < 2:
            raise UserError(f"samples must be >= 2, got {self.samples!r}")
        check_overrides(self.overrides)
        check_lrs(self.lrs, self.methods)
        self.run_config("lora", self.seeds[0])

    def run_config(self, method: str, seed: int):
        return budget_config(self, task=self.task, method=method, seed=seed, lr=self.lr_of(method))


def run(config: ShapleyConfig) -> dict:
    """Train one adapter per (method, seed), then estimate per-layer Shapley values of each."""
    from copra.experiments.runner.runs import run_all

    data = prepare_data(config.run_config(config.methods[0], config.seeds[0]))  # fails early on a bad task
    out = Path(config.output_dir)
    plan = [(config.run_config(m, s), out / "runs" / m / f"seed{s}") for m in config.methods for s in config.seeds]
    results = iter(run_all(plan, config.jobs, config.executor, config.ray_address))
    adapters = {m: [next(results).adapter_dir for _ in config.seeds] for m in config.methods}
    return run_from_adapters(adapters, config, data)


def run_from_adapters(adapters: dict[str, list[str]], config: ShapleyConfig, data: FewShotData | None = None) -> dict:
    """Shapley values of given adapter folders {method: [folder, ...]}; writes JSON, PNG, Markdown."""
    from copra.analysis.coalitions import shapley_for_model
    from copra.core.gates import CopRA
    from copra.models.evaluation import load_adapter_state

    started = time.perf_counter()
    data = data or prepare_data(config.run_config(config.methods[0], config.seeds[0]))
    evaluator = Evaluator(config.run_config(config.methods[0], config.seeds[0]))
    summary: dict[str, Any] = {"config": asdict(config), "task": data.task, "methods": {}}
    for method, folders in adapters.items():
        rows = []
        for folder in folders:
            state, adapter_config = load_for_eval(folder, task=data.task)
            classifier = evaluator.classifier(adapter_config, str(folder))
            classifier.set_prompts(list(data.prompts))
            load_adapter_state(classifier, state)
            gates = CopRA(classifier.encoder, total_steps=1, granularity=config.granularity)
            try:
                tick = time.perf_counter()
                estimate = shapley_for_model(
                    classifier, gates, data, config.estimator, config.samples, metric=config.metric
                )
                row = {
                    "folder": str(folder),
                    "players": estimate.players,
                    "values": estimate.values.tolist(),
                    "stderr": estimate.stderr.tolist(),
                    "v_empty": estimate.v_empty,
                    "v_full": estimate.v_full,
                    "evaluations": estimate.evaluations,
                    "method": estimate.method,
                    "seconds": time.perf_counter() - tick,
                }
                if config.compare_exact and estimate.method != "exact" and affordable(len(gates.players), 2**16):
                    exact = shapley_for_model(classifier, gates, data, "exact", metric=config.metric)
                    row["exact"] = exact.values.tolist()
                    row["max_abs_error"] = float(np.max(np.abs(exact.values - estimate.values)))
                rows.append(row)
            finally:
                gates.remove()
        values = np.array([r["values"] for r in rows])  # [seeds, players]
        summary["methods"][method] = {
            "players": rows[0]["players"],
            "runs": rows,
            "mean": values.mean(0).tolist(),
            "std": values.std(0, ddof=1).tolist() if len(rows) > 1 else [0.0] * values.shape[1],
            # the estimator's own error of the seed mean: sqrt(sum of squared stderrs) / seeds
            "estimator_se": (np.sqrt(np.nansum(np.square([r["stderr"] for r in rows]), 0)) / len(rows)).tolist(),
            "max_abs_error": max((r["max_abs_error"] for r in rows if "max_abs_error" in r), default=None),
        }
    summary["wall_seconds"] = time.perf_counter() - started
    out = Path(config.output_dir)
    write_outputs(out, "shapley", summary, plot, render)
    return summary


def module_grid(players: list[str], values: list[float]) -> tuple[list[str], list[str], np.ndarray]:
    """(blocks, projections, [blocks, projections] matrix of values; NaN where a block lacks that module)."""
    blocks = list(dict.fromkeys(player_of(p, "layer") for p in players))
    projections = list(dict.fromkeys(projection_of(p) or p.rsplit(".", 1)[-1] for p in players))
    grid = np.full((len(blocks), len(projections)), np.nan)
    for player, value in zip(players, values):
        grid[
            blocks.index(player_of(player, "layer")),
            projections.index(projection_of(player) or player.rsplit(".", 1)[-1]),
        ] = value
    return blocks, projections, grid


def plot(summary: dict, path: Path) -> Path:
    """`draw(summary)` as a PNG at `path`."""
    return save_figure(draw(summary), path, dpi=110)


def draw(summary: dict):
    """Fig. 2: a bar per layer, one colour per method, error bars over seeds (module players: heat maps)."""
    if summary["config"].get("granularity") == "module":
        return draw_heatmap(summary)
    figure, axes = new_axes(8, 4)
    methods = list(summary["methods"])
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        row = summary["methods"][method]
        xs = np.arange(len(row["mean"])) + (i - (len(methods) - 1) / 2) * width
        axes.bar(xs, row["mean"], width, yerr=row["std"], capsize=3, label=LABELS.get(method, method))
    players = summary["methods"][methods[0]]["players"]
    axes.set_xticks(range(len(players)), [p.rsplit(".", 1)[-1] for p in players])
    axes.set_xlabel("layer (player)")
    axes.set_ylabel(f"Shapley value ({summary['config']['metric']})")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_title(f"per-layer Shapley values on {summary['task']} ({summary['config']['estimator']})")
    axes.legend()
    return figure


def block_label(block: str) -> str:
    """'encoder.layer.3' -> '3'; 'vision_model.encoder.layers.3' -> 'vision_model 3' (towers stay apart)."""
    return re.sub(r"(?:^|\.)(?:encoder\.)?(?:layer|layers|h|block|blocks)\.(?=\d+$)", " ", block).strip()


def plot_heatmap(summary: dict, path: Path) -> Path:
    """`draw_heatmap(summary)` as a PNG at `path`."""
    return save_figure(draw_heatmap(summary), path, dpi=110)


def draw_heatmap(summary: dict):
    """One block x projection heat map per method, on one colour scale centred at 0."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    methods = list(summary["methods"])
    grids = [module_grid(summary["methods"][m]["players"], summary["methods"][m]["mean"]) for m in methods]
    bound = max(float(np.nanmax(np.abs(g))) for *_, g in grids) or 1.0
    figure = Figure(figsize=(2.6 * len(methods) + 1.2, 4), layout="constrained")
    axes = figure.subplots(1, len(methods), squeeze=False)[0]
    for ax, method, (blocks, projections, grid) in zip(axes, methods, grids):
        image = ax.imshow(grid, cmap="RdBu", norm=TwoSlopeNorm(0.0, -bound, bound), aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:+.3f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(projections)), projections)
        ax.set_yticks(range(len(blocks)), [block_label(b) for b in blocks])
        ax.set_xlabel("projection")
        ax.set_title(LABELS.get(method, method))
    axes[0].set_ylabel("block")
    figure.colorbar(image, ax=list(axes), label=f"Shapley value ({summary['config']['metric']})")
    figure.suptitle(f"per-module Shapley values on {summary['task']} ({summary['config']['estimator']})")
    return figure


def render(summary: dict) -> str:
    c = summary["config"]
    if c.get("granularity") == "module":
        return render_modules(summary)
    methods = list(summary["methods"])
    players = summary["methods"][methods[0]]["players"]
    lines = [
        f"## Per-layer Shapley values ({summary['task']}, paper Fig. 2)",
        "",
        f"v(C) = {c['metric']} with only the layers in C adapted; estimator {c['estimator']}"
        + ("" if c["estimator"] == "exact" else f" ({c['samples']} samples)")
        + f", mean ± std over seeds {c['seeds']}.",
        "",
        "| layer | " + " | ".join(LABELS.get(m, m) for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for j, player in enumerate(players):
        cells = [f"{summary['methods'][m]['mean'][j]:+.4f} ± {summary['methods'][m]['std'][j]:.4f}" for m in methods]
        lines.append(f"| {player.rsplit('.', 1)[-1]} | " + " | ".join(cells) + " |")
    totals = [f"{sum(summary['methods'][m]['mean']):+.4f}" for m in methods]
    lines.append("| sum = v(all) - v(none) | " + " | ".join(totals) + " |")
    errors = [summary["methods"][m]["max_abs_error"] for m in methods]
    if any(e is not None for e in errors) and c["estimator"] != "exact" and c["compare_exact"]:
        lines += [
            "",
            "Max abs error of the estimate vs exact Shapley: "
            + ", ".join(
                f"{LABELS.get(m, m)} " + ("n/a (exact)" if e is None else f"{e:.4f}") for m, e in zip(methods, errors)
            ),
        ]
    lines += ["", "![shapley](shapley.png)", "", f"Wall time: {summary['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def render_modules(summary: dict) -> str:
    """Per-module values as one block x projection table per method (mean, estimator SE)."""
    c = summary["config"]
    lines = [
        f"## Per-module Shapley values ({summary['task']}, beyond the paper)",
        "",
        f"v(C) = {c['metric']} with only the LoRA modules in C on; estimator {c['estimator']}"
        + ("" if c["estimator"] == "exact" else f" ({c['samples']} samples)")
        + f"; cells: mean over seeds {c['seeds']} (± the estimator's standard error of that mean).",
        "",
    ]
    for method, row in summary["methods"].items():
        blocks, projections, grid = module_grid(row["players"], row["mean"])
        _, _, se = module_grid(row["players"], row.get("estimator_se") or [float("nan")] * len(row["players"]))
        gain = np.mean([r["v_full"] - r["v_empty"] for r in row["runs"]])
        lines += [
            f"**{LABELS.get(method, method)}** (sum of values {sum(row['mean']):+.4f}; v(all) - v(none) {gain:+.4f})",
            "",
            "| block | " + " | ".join(projections) + " |",
            "|---|" + "---|" * len(projections),
        ]
        for i, block in enumerate(blocks):
            lines.append(
                f"| {block_label(block)} | "
                + " | ".join(
                    "-" if not np.isfinite(grid[i, j]) else f"{grid[i, j]:+.4f} ± {se[i, j]:.4f}"
                    for j in range(len(projections))
                )
                + " |"
            )
        lines.append("")
    lines += ["![shapley](shapley.png)", "", f"Wall time: {summary['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)
