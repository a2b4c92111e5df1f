"""Sweeps of training settings, single vs merged accuracy (paper Sec. 3.3: Fig. 5a/5b, Fig. 6a/6b).

A sweep trains every (variant, grid point, seed), evaluates each adapter alone, and fuses every pair
of seeds at alpha (0.5) to measure how well same-setting adapters merge. Variants are named
TrainConfig overrides, so one experiment covers the paper's comparisons and the baselines:

- Fig. 5b: grid {lr: [...]}, variants LoRA / CopRA: merging accuracy across learning rates;
- Fig. 6a/6b: grid {steps: [...], lr: [...]}: single and merged accuracy over iterations x lr;
- schedules and baselines (`SCHEDULE_VARIANTS`): CopRA's linear / exponential / sine ramps, a start
  at p=0.1, a shorter ramp, and what CopRA might reduce to -- plain LoRA with and without adapter
  dropout, and stochastic depth for LoRA (every layer kept with a fixed p=0.5 all along);
- CopRA on DoRA (`variants: dora`): LoRA, CopRA, DoRA and CopRA on DoRA side by side;
- Fig. 5a (`geometry: true`): t-SNE of all adapters and seed-to-seed cosine / L2 per setting;
- Fig. 6c (`curve_every: k`): single and merged accuracy every k steps (runs save snapshots);
  `curve_prune: [every_other]` also scores each snapshot structurally pruned (issue 12's crossover).

Runs go through `runs.run_all`: finished ones are reused (a killed sweep resumes) and `jobs` > 1
trains them in parallel processes.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from copra.adapters.io import load_adapter
from copra.adapters.merge import fusion
from copra.adapters.prune import STRUCTURED, structured
from copra.core.config import TrainConfig, make_config
from copra.experiments.runner.common import (
    Evaluator,
    RunExecution,
    TrainingBudget,
    check_unique,
    mean_std,
    save_figure,
    write_outputs,
)
from copra.experiments.runner.runs import run_all
from copra.models.evaluation import prepare_data
from copra.training.run_folder import snapshot_dir, snapshot_steps
from copra.utils.errors import UserError

RESERVED = ("task", "seed", "output_dir", "progress", "save_early")
PAPER_VARIANTS = {"LoRA": {"method": "lora"}, "CopRA": {"method": "copra"}}
SCHEDULE_VARIANTS = {
    "LoRA": {"method": "lora"},
    "LoRA, no adapter dropout": {"method": "lora", "lora_dropout": 0.0},
    "stochastic depth p=0.5": {"method": "copra", "initial_p": 0.5, "final_p": 0.5},
    "CopRA linear": {"method": "copra", "ramp": "linear"},
    "CopRA exponential": {"method": "copra", "ramp": "exponential"},
    "CopRA sine": {"method": "copra", "ramp": "sine"},
    "CopRA p0=0.1": {"method": "copra", "initial_p": 0.1},
    "CopRA ramp 1/2": {"method": "copra", "ramp_fraction": 0.5},
}
# CopRA on PEFT's DoRA: does gating whole layers still help when each layer also learns a magnitude?
DORA_VARIANTS = {
    "LoRA": {"method": "lora"},
    "CopRA": {"method": "copra"},
    "DoRA": {"method": "lora", "use_dora": True},
    "CopRA on DoRA": {"method": "copra", "use_dora": True},
}
VARIANT_SETS = {"paper": PAPER_VARIANTS, "schedules": SCHEDULE_VARIANTS, "dora": DORA_VARIANTS}


@dataclass
class SweepConfig(TrainingBudget, RunExecution):
    """One sweep: named variants x a grid of up to two TrainConfig keys x seeds."""

    name: str = "sweep_lr"  #: output file stem, so several sweeps share a results folder
    task: str = "bbc_news"  #: task every run trains and is evaluated on
    variants: Any = "paper"  #: "paper", "schedules", "dora", or a mapping name -> TrainConfig overrides
    grid: dict[str, list] = field(default_factory=lambda: {"lr": [5e-4, 1e-3, 5e-3, 1e-2]})  #: 0-2 swept keys
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  #: adapters per setting; every pair is fused
    alpha: float = 0.5  #: fusion coefficient of the merged accuracy
    geometry: bool = False  #: also t-SNE and seed-to-seed cosine / L2 of the adapters (Fig. 5a)
    #: also each point's merge diagnostics: mixture, shrinkage control, barrier split, cross-entropy (merge_map's)
    diagnostics: bool = False
    curve_every: int = 0  #: also single and merged accuracy every this many steps (Fig. 6c; 0: off)
    curve_prune: list[str] = field(
        default_factory=list
    )  #: structured pruning schemes (e.g. every_other) also scored along the curve
    output_dir: str = "results/sweep"  #: where adapters, JSON, PNG and Markdown go

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.replace("_", "").replace("-", "").isalnum():
            raise UserError(f"name must be letters, digits, '_' or '-', got {self.name!r}")
        if isinstance(self.variants, str):
            if self.variants not in VARIANT_SETS:
                raise UserError(
                    f"unknown variant set {self.variants!r}; choose from {list(VARIANT_SETS)} or give a mapping"
                )
            self.variants = {k: dict(v) for k, v in VARIANT_SETS[self.variants].items()}
        if not isinstance(self.variants, dict) or not self.variants:
            raise UserError(
                f"variants must be a non-empty mapping name -> TrainConfig overrides, got {self.variants!r}"
            )
        if not isinstance(self.grid, dict) or len(self.grid) > 2:
            raise UserError(f"grid must map at most two TrainConfig keys to lists of values, got {self.grid!r}")
        known = {f.name for f in fields(TrainConfig)} | {"preset"}  # make_config starts from a preset
        for where, keys in [
            (f"variant {n!r}", list(v) if isinstance(v, dict) else None) for n, v in self.variants.items()
        ] + [
            ("grid", list(self.grid)),
            ("overrides", list(self.overrides) if isinstance(self.overrides, dict) else None),
        ]:
            if keys is None:
                raise UserError(f"{where} must be a mapping of TrainConfig keys")
            bad = [k for k in keys if k not in known or k in RESERVED]
            if bad:
                raise UserError(f"{where}: {bad[0]!r} is not a TrainConfig key the sweep may set")
        for key, values in self.grid.items():
            check_unique(f"grid[{key!r}]", values)
            clash = [n for n, v in self.variants.items() if key in v]
            if clash:
                raise UserError(f"grid key {key!r} is also set by variant {clash[0]!r}")
        check_unique("seeds", self.seeds, minimum=2)
        if isinstance(self.curve_every, bool) or not isinstance(self.curve_every, int) or self.curve_every < 0:
            raise UserError(f"curve_every must be a non-negative integer, got {self.curve_every!r}")
        if self.curve_prune:
            check_unique("curve_prune", self.curve_prune, [s for s in STRUCTURED if s != "all"])
            if not self.curve_every:
                raise UserError("curve_prune needs curve_every (the snapshots it prunes)")
        if "snapshot_every" in self.grid or any("snapshot_every" in v for v in self.variants.values()):
            raise UserError("snapshot_every is set by the sweep's curve_every")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise UserError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        for name in ("geometry", "progress", "diagnostics"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for variant in self.variants:
            for point in self.points():
                self.run_config(variant, point, self.seeds[0])  # validates every run's TrainConfig

    def points(self) -> list[dict[str, Any]]:
        """Every grid point as {key: value}; one empty point when nothing is swept."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def run_config(self, variant: str, point: dict[str, Any], seed: int) -> TrainConfig:
        base = dict(
            shots=self.shots,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            model=self.model,
            eval_examples=self.eval_examples,
        )
        try:
            return make_config(
                {
                    **self.overrides,
                    **base,
                    **self.variants[variant],
                    **point,
                    "task": self.task,
                    "seed": seed,
                    "progress": self.progress,
                    "snapshot_every": self.curve_every,
                }
            )
        except UserError as error:
            raise UserError(f"variant {variant!r} {label(point)}: {error}") from None


def label(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()) or "default"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)


def run(config: SweepConfig) -> dict:
    """Train (or reuse) every run, evaluate single and pairwise-fused accuracy, write the outputs."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    points = config.points()
    first = config.run_config(next(iter(config.variants)), points[0], config.seeds[0])
    data = prepare_data(first)  # the evaluation subset does not depend on the seed
    plan = [(variant, i, seed) for variant in config.variants for i in range(len(points)) for seed in config.seeds]
    runs = [
        (
            config.run_config(v, points[i], s),
            out / "runs" / config.name / slug(v) / slug(label(points[i])) / f"seed{s}",
        )
        for v, i, s in plan
    ]
    results = dict(zip(plan, run_all(runs, config.jobs, config.executor, config.ray_address)))
    evaluator = Evaluator(first)
    summary: dict[str, Any] = {
        "experiment": "sweep",
        "name": config.name,
        "config": asdict(config),
        "task": data.task,
        "axes": list(config.grid),
        "points": [],
    }
    states = []
    for variant in config.variants:
        for index, point in enumerate(points):
            seed_runs = [results[variant, index, s] for s in config.seeds]
            loaded = [load_adapter(r.adapter_dir) for r in seed_runs]
            merged = [
                evaluator.accuracy(
                    fusion([loaded[i][0], loaded[j][0]], [config.alpha, 1 - config.alpha]), loaded[i][1], data
                )
                for i, j in itertools.combinations(range(len(loaded)), 2)
            ]
            single = [r.accuracy for r in seed_runs]
            row = {
                "variant": variant,
                "values": point,
                "label": label(point),
                "single": single,
                "merged": merged,
                "single_mean": mean_std(single)[0],
                "single_std": mean_std(single)[1],
                "merged_mean": mean_std(merged)[0],
                "merged_std": mean_std(merged)[1],
                "seconds_per_step": mean_std(r.seconds_per_step for r in seed_runs)[0],
                "step_seconds": [r.seconds_per_step for r in seed_runs],
            }
            if config.diagnostics:
                from copra.experiments.runner.diagnostics import pair_diagnostics, summarise

                row["diagnostics"] = summarise(pair_diagnostics(evaluator, data, loaded))
            if config.curve_every:
                row["curve"] = curve(evaluator, data, config, runs_of(seed_runs), loaded, seed_runs[0].config["steps"])
            if config.geometry:
                from copra.experiments.geometry import pair_similarity

                similarity = pair_similarity([state for state, _ in loaded])
                row["cosine_mean"], row["l2_mean"] = mean_std(similarity["cosine"])[0], mean_std(similarity["l2"])[0]
                states += [(variant, point, seed, state) for seed, (state, _) in zip(config.seeds, loaded)]
            summary["points"].append(row)
    if config.geometry:
        from copra.experiments.geometry import tsne

        coords = tsne([s for *_, s in states], seed=config.seeds[0])
        summary["tsne"] = [
            {"variant": v, "label": label(p), "seed": s, "x": float(x), "y": float(y)}
            for (v, p, s, _), (x, y) in zip(states, coords)
        ]
    summary["wall_seconds"] = time.perf_counter() - started
    write_outputs(out, config.name, summary, plot, render)
    return summary


def runs_of(results: list) -> list[Path]:
    """The run folders of finished runs (each adapter's parent)."""
    return [Path(r.adapter_dir).parent for r in results]


def curve(evaluator: Evaluator, data, config: SweepConfig, folders: list[Path], final: list, total_steps: int) -> dict:
    """Single and pairwise-merged accuracy at every snapshot step and at the end (paper Fig. 6c)."""
    steps = snapshot_steps(folders[0])
    out: dict[str, Any] = {
        "steps": [],
        "single_mean": [],
        "merged_mean": [],
        "merged_std": [],
        "single": [],
        "merged": [],
    }  # single: [step][seed]; merged: [step][seed pair], as combinations
    if config.curve_prune:
        out["pruned"] = {scheme: [] for scheme in config.curve_prune}  # [step][seed], each adapter pruned
    for step in steps + [None]:
        loaded = final if step is None else [load_adapter(snapshot_dir(f, step)) for f in folders]
        single = [evaluator.accuracy(state, cfg, data) for state, cfg in loaded]
        for scheme in config.curve_prune:
            out["pruned"][scheme].append(
                [evaluator.accuracy(structured(state, scheme), cfg, data) for state, cfg in loaded]
            )
        merged = [
            evaluator.accuracy(
                fusion([loaded[i][0], loaded[j][0]], [config.alpha, 1 - config.alpha]), loaded[i][1], data
            )
            for i, j in itertools.combinations(range(len(loaded)), 2)
        ]
        out["steps"].append(total_steps if step is None else step)
        out["single_mean"].append(mean_std(single)[0])
        out["merged_mean"].append(mean_std(merged)[0])
        out["merged_std"].append(mean_std(merged)[1])
        out["single"].append(single)
        out["merged"].append(merged)
    return out


def best(summary: dict, variant: str, key: str = "merged_mean") -> dict | None:
    """The variant's row with the highest `key` (None if the variant is absent)."""
    rows = [r for r in summary["points"] if r["variant"] == variant]
    return max(rows, key=lambda r: r[key]) if rows else None


# ----------------------------------------------------------------------------- outputs
def plot(summary: dict, path: str | Path) -> Path:
    """`draw(summary)` as a PNG at `path`."""
    return save_figure(draw(summary), path, dpi=110)


def draw(summary: dict):
    """The sweep's figure (a matplotlib Figure, not yet saved; tests read the plotted data from it)."""
    from matplotlib.figure import Figure

    axes_keys, variants = summary["axes"], list(dict.fromkeys(r["variant"] for r in summary["points"]))
    curves = any("curve" in r for r in summary["points"])
    panels = 1 + ("tsne" in summary) + curves
    if len(axes_keys) == 2:
        figure = Figure(figsize=(4.2 * len(variants), 7.2), layout="constrained")
        grid = figure.subplots(2, len(variants), squeeze=False)
        _heatmaps(summary, grid, variants)
    else:
        figure = Figure(figsize=(7.5 * panels, 4.5), layout="constrained")
        ax = figure.subplots(1, panels, squeeze=False)[0]
        (_lines if axes_keys else _bars)(summary, ax[0], variants)
        if "tsne" in summary:
            _tsne(summary, ax[1], variants)
        if curves:
            _curves(summary, ax[-1])
    figure.suptitle(
        f"{summary['name']}: single vs merged (alpha={summary['config']['alpha']}) accuracy, {summary['task']}"
    )
    return figure


def _lines(summary: dict, ax, variants: list[str]) -> None:
    key = summary["axes"][0]
    values = [r["values"][key] for r in summary["points"]]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    for i, variant in enumerate(variants):
        rows = [r for r in summary["points"] if r["variant"] == variant]
        xs = [r["values"][key] if numeric else str(r["values"][key]) for r in rows]
        colour = f"C{i}"
        ax.errorbar(
            xs,
            [100 * r["merged_mean"] for r in rows],
            yerr=[100 * r["merged_std"] for r in rows],
            color=colour,
            marker="o",
            capsize=3,
            label=f"{variant} merged",
        )
        ax.errorbar(
            xs,
            [100 * r["single_mean"] for r in rows],
            yerr=[100 * r["single_std"] for r in rows],
            color=colour,
            marker="s",
            linestyle="--",
            capsize=3,
            alpha=0.7,
            label=f"{variant} single",
        )
    if numeric and min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _bars(summary: dict, ax, variants: list[str]) -> None:
    from copra.experiments.runner.common import zoom_bars

    rows = {r["variant"]: r for r in summary["points"]}
    xs = range(len(variants))
    heights = []
    for offset, kind in ((-0.2, "single"), (0.2, "merged")):
        h = [100 * rows[v][f"{kind}_mean"] for v in variants]
        ax.bar(
            [x + offset for x in xs],
            h,
            width=0.4,
            yerr=[100 * rows[v][f"{kind}_std"] for v in variants],
            capsize=3,
            label=kind,
        )
        heights += h
    ax.set_xticks(list(xs), variants, rotation=25, ha="right", fontsize=8)
    zoom_bars(ax, heights)
    ax.set_ylabel("accuracy (%)")
    ax.legend()


def _heatmaps(summary: dict, grid, variants: list[str]) -> None:
    (row_key, col_key) = summary["axes"]
    rows_v = list(dict.fromkeys(r["values"][row_key] for r in summary["points"]))
    cols_v = list(dict.fromkeys(r["values"][col_key] for r in summary["points"]))
    for c, variant in enumerate(variants):
        cells = {(r["values"][row_key], r["values"][col_key]): r for r in summary["points"] if r["variant"] == variant}
        for k, kind in enumerate(("single", "merged")):
            ax = grid[k][c]
            table = [[100 * cells[rv, cv][f"{kind}_mean"] for cv in cols_v] for rv in rows_v]
            ax.imshow(table, cmap="viridis", vmin=0, vmax=100, aspect="auto")
            for i, line in enumerate(table):
                for j, value in enumerate(line):
                    ax.text(
                        j,
                        i,
                        f"{value:.1f}",
                        ha="center",
                        va="center",
                        color="white" if value < 60 else "black",
                        fontsize=8,
                    )
            ax.set_xticks(range(len(cols_v)), [f"{v:g}" if isinstance(v, float) else str(v) for v in cols_v])
            ax.set_yticks(range(len(rows_v)), [str(v) for v in rows_v])
            ax.set_xlabel(col_key)
            ax.set_ylabel(row_key)
            ax.set_title(f"{variant}: {kind}", fontsize=9)


def _curves(summary: dict, ax) -> None:
    """Paper Fig. 6c: merged (solid) and single (dashed) accuracy over training steps."""
    for i, row in enumerate(r for r in summary["points"] if "curve" in r):
        c = row["curve"]
        name = row["variant"] + (f", {row['label']}" if row["values"] else "")
        ax.errorbar(
            c["steps"],
            [100 * v for v in c["merged_mean"]],
            yerr=[100 * v for v in c["merged_std"]],
            color=f"C{i}",
            marker="o",
            capsize=3,
            label=f"{name} merged",
        )
        ax.plot(
            c["steps"],
            [100 * v for v in c["single_mean"]],
            color=f"C{i}",
            linestyle="--",
            alpha=0.7,
            label=f"{name} single",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy over training steps", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _tsne(summary: dict, ax, variants: list[str]) -> None:
    labels = list(dict.fromkeys(p["label"] for p in summary["tsne"]))
    markers = "osD^v<>P*X"
    for i, variant in enumerate(variants):
        for j, lab in enumerate(labels):
            pts = [p for p in summary["tsne"] if p["variant"] == variant and p["label"] == lab]
            if pts:
                ax.scatter(
                    [p["x"] for p in pts],
                    [p["y"] for p in pts],
                    color=f"C{i}",
                    marker=markers[j % len(markers)],
                    label=f"{variant}, {lab}",
                    s=40,
                )
    ax.set_title("t-SNE of flattened adapters (one point per seed)", fontsize=9)
    ax.legend(fontsize=7)


def render(summary: dict) -> str:
    c = summary["config"]
    geometry = "cosine_mean" in (summary["points"][0] if summary["points"] else {})
    lines = [
        f"### Sweep `{summary['name']}` on {summary['task']}",
        "",
        f"Seeds {c['seeds']} ({len(c['seeds'])} adapters per setting; merged = fusion at alpha={c['alpha']} "
        f"of every seed pair), {c['shots']} shots/class, {c['steps']} steps unless swept, lr {c['lr']:g} unless "
        f"swept, {c['eval_examples']} evaluation examples. Wall time {summary['wall_seconds']:.0f} s.",
        "",
        "| variant | setting | single acc. (%) | merged acc. (%) | s/step"
        + (" | cos (seeds) | L2 (seeds)" if geometry else "")
        + " |",
        "|---|---|---|---|---" + ("|---|---" if geometry else "") + "|",
    ]
    for r in summary["points"]:
        line = (
            f"| {r['variant']} | {r['label']} | {100 * r['single_mean']:.1f} ± {100 * r['single_std']:.1f} | "
            f"{100 * r['merged_mean']:.1f} ± {100 * r['merged_std']:.1f} | {r['seconds_per_step']:.3f}"
        )
        if geometry:
            line += f" | {r['cosine_mean']:.3f} | {r['l2_mean']:.3f}"
        lines.append(line + " |")
    for r in (r for r in summary["points"] if "curve" in r):
        c = r["curve"]
        lines += [
            "",
            f"{r['variant']} {r['label']} over training steps (merged / single, %): "
            + ", ".join(
                f"step {s}: {100 * m:.1f} / {100 * v:.1f}"
                for s, m, v in zip(c["steps"], c["merged_mean"], c["single_mean"])
            ),
        ]
    with_diagnostics = [r for r in summary["points"] if "diagnostics" in r]
    if with_diagnostics:
        lines += [
            "",
            "Merge diagnostics (points; barrier = single - fused = averaging + misalignment; shrinkage = single - "
            "single x1/4):",
            "",
            "| variant | setting | mixture | barrier | averaging | misalignment | shrinkage | CE barrier |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in with_diagnostics:
            d = r["diagnostics"]
            lines.append(
                f"| {r['variant']} | {r['label']} | {d['mixture']:.1f} | {d['barrier']:.1f} | {d['averaging']:.1f} "
                f"| {d['misalignment']:.1f} | {d['shrinkage']:.1f} | {d['barrier_ce']:.3f} |"
            )
    lines += ["", f"![{summary['name']}]({summary['name']}.png)", ""]
    return "\n".join(lines)
