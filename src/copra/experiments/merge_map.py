"""Where do LoRA's merges break? The barrier map (issue 23), on validation data only.

The converged suite asked whether CopRA's adapters merge better where LoRA's merges do not break
(fusing two bbc_news seeds costs LoRA about a point), and so could not tell. The paper's regime (CLIP,
lr 5e-4, 500 x shots iterations, 24 gated blocks) breaks them by 6-15 points. This experiment maps
LoRA's barrier (mean single accuracy of a seed pair minus its fusion at 1/2) one axis at a time from a
paper-like point, with CopRA beside it:

    cells = [base] + [base with axis = value, for each axis and value]      (not a full factorial)

Axes are TrainConfig keys (lr, steps, rank, target_modules, ...) or, where one setting needs several
keys (a deeper model names its projections differently), a list of override mappings. Every run is
scored on one shared validation set per task (`prepare_shared_validation`: carved from the training
pool, never a run's few-shot sample, never the test split), through `runner.diagnostics`: single,
fused, mixture and shrinkage controls in accuracy and cross-entropy, per-example outcomes kept.
Cells where LoRA's barrier reaches `keep_barrier` points are the ones the protocol is asked on.

Resumable: training runs are reused (`runs.run_all`), each evaluated (task, cell, method) is stored in
`cells/`, and the summary is rewritten after every cell, so a partial map is readable while it runs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from copra.adapters.io import load_adapter
from copra.core.config import METHODS, TrainConfig, make_config
from copra.data.fewshot import prepare_shared_validation
from copra.experiments.runner.clients import client_configs, one_shot_fl, partition_alpha
from copra.experiments.runner.common import (
    Evaluator,
    RunExecution,
    TrainingBudget,
    budget_config,
    check_overrides,
    check_unique,
    save_figure,
    write_outputs,
)
from copra.experiments.runner.diagnostics import outcome, pair_diagnostics, summarise
from copra.experiments.runner.runs import run_all
from copra.utils.atomic import write_json
from copra.utils.errors import UserError

BASE_CELL = "base"
FIXED = ("task", "seed", "method", "output_dir", "progress", "shots")  # a cell may not change the few-shot sample


@dataclass
class MergeMapConfig(TrainingBudget, RunExecution):
    """LoRA's seed-pair merge barrier (CopRA beside it) over tasks x cells, on validation data."""

    name: str = "merge_map"  #: output file stem
    tasks: list[str] = field(default_factory=lambda: ["covid_intents", "hwu64", "banking77", "clinc150"])  #: tasks
    methods: list[str] = field(default_factory=lambda: ["lora", "copra"])  #: training methods mapped
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  #: adapters per cell; every pair is fused
    #: the paper-like point every axis starts from (TrainConfig keys; steps and lr come from the budget)
    base: dict[str, Any] = field(default_factory=lambda: {"rank": 2, "target_modules": ["query", "key", "value"]})
    #: axis -> values: a TrainConfig key and its values, or any name and a list of override mappings
    axes: dict[str, list] = field(
        default_factory=lambda: {
            "lr": [5e-5, 5e-3, 2e-2],
            "steps": [2000, 4000],
            "rank": [8],
            "target_modules": [["query", "key", "value", "dense"]],
        }
    )
    #: kinds of merge mapped: seeds (every seed pair fused), fl_iid, fl_dirichlet_<alpha> (one-shot FL, `clients`)
    merges: list[str] = field(default_factory=lambda: ["seeds"])
    clients: int = 5  #: clients of an FL merge (shares of each run's few-shot sample, the run's init)
    validation_examples: int = 400  #: shared validation set per task (class-balanced, from the training pool)
    keep_barrier: float = 3.0  #: a cell is kept when LoRA's barrier is at least this many points
    shots: int = 8  #: training examples per class
    steps: int = 500  #: optimizer steps at the base point
    lr: float = 5e-4  #: peak lr at the base point (the paper's)
    output_dir: str = "results/merge_map"  #: where runs, cells, JSON, PNG and Markdown go

    def __post_init__(self) -> None:
        check_unique("tasks", self.tasks)
        check_unique("methods", self.methods, METHODS)
        check_unique("seeds", self.seeds, minimum=2)
        check_overrides(self.overrides)
        check_unique("merges", self.merges)
        for merge in self.merges:
            if merge != "seeds" and not merge.startswith("fl_"):
                raise UserError(f"unknown merge {merge!r}; choose from seeds, fl_iid, fl_dirichlet_<alpha>")
            if merge != "seeds":
                partition_alpha(merge.removeprefix("fl_"))
        if isinstance(self.clients, bool) or not isinstance(self.clients, int) or self.clients < 2:
            raise UserError(f"clients must be an integer >= 2, got {self.clients!r}")
        known = {f.name for f in fields(TrainConfig)}
        self._check_overrides("base", self.base, known)
        if not isinstance(self.axes, dict):
            raise UserError(f"axes must map an axis to a list of values, got {self.axes!r}")
        for axis, values in self.axes.items():
            if not isinstance(values, list) or not values:
                raise UserError(f"axes[{axis!r}] must be a non-empty list, got {values!r}")
            for value in values:
                if isinstance(value, dict):
                    self._check_overrides(f"axes[{axis!r}]", value, known)
                elif axis not in known or axis in FIXED:
                    raise UserError(f"axes[{axis!r}]: not a TrainConfig key a cell may set (give override mappings)")
        if not isinstance(self.validation_examples, int) or self.validation_examples < 10:
            raise UserError(f"validation_examples must be an integer >= 10, got {self.validation_examples!r}")
        if not isinstance(self.keep_barrier, (int, float)) or not math.isfinite(self.keep_barrier):
            raise UserError(f"keep_barrier must be a number of points, got {self.keep_barrier!r}")
        labels = [label for label, _ in self.cells()]
        if len(set(labels)) != len(labels):
            raise UserError(f"two cells have one label: {labels}")
        for task in self.tasks:
            for _, cell in self.cells():
                self.run_config(task, cell, self.methods[0], self.seeds[0])  # validates every run

    @staticmethod
    def _check_overrides(where: str, overrides: Any, known: set[str]) -> None:
        if not isinstance(overrides, dict):
            raise UserError(f"{where} must be a mapping of TrainConfig keys, got {overrides!r}")
        bad = [k for k in overrides if k not in known or k in FIXED]
        if bad:
            raise UserError(f"{where}: {bad[0]!r} is not a TrainConfig key a cell may set")

    def cells(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, overrides on top of `base`): the base point, then one axis at a time."""
        out = [(BASE_CELL, {})]
        for axis, values in self.axes.items():
            for value in values:
                change = dict(value) if isinstance(value, dict) else {axis: value}
                if all(self._at_base(k, v) for k, v in change.items()):
                    continue  # the base point itself
                out.append((f"{axis}={_show(value)}", change))
        return out

    def planned_runs(self) -> list[TrainConfig]:
        """Every run this map trains: each cell's seeds, and their FL clients (`report.timing` counts them)."""
        out = []
        for task in self.tasks:
            for _, cell in self.cells():
                for method in self.methods:
                    for seed in self.seeds:
                        run = self.run_config(task, cell, method, seed)
                        out.append(run)
                        out += [c for m in self.merges if m != "seeds" for c in client_configs(run, self.clients)]
        return out

    def _at_base(self, key: str, value: Any) -> bool:
        budget = {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "model": self.model}
        return {**budget, **self.base}.get(key, object()) == value

    def run_config(self, task: str, cell: dict[str, Any], method: str, seed: int) -> TrainConfig:
        try:
            config = budget_config(self, task=task, method=method, seed=seed)
            return make_config({**config.to_dict(), **self.base, **cell, "progress": False})
        except UserError as error:
            raise UserError(f"task {task!r}, cell {cell or BASE_CELL!r}: {error}") from None


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_show(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in text)


def run(config: MergeMapConfig) -> dict:
    """Train and diagnose every (task, cell, method); the summary is rewritten after each cell."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    summary: dict[str, Any] = {"experiment": "merge_map", "name": config.name, "config": asdict(config), "rows": []}
    cells = config.cells()
    total, done = len(config.tasks) * len(cells), 0
    for task in config.tasks:
        configs = [config.run_config(task, {}, config.methods[0], s) for s in config.seeds]
        data = prepare_shared_validation(configs, config.validation_examples)
        for label, cell in cells:
            plan = [(m, s) for m in config.methods for s in config.seeds]
            runs = [
                (config.run_config(task, cell, m, s), out / "runs" / task / _slug(label) / m / f"seed{s}")
                for m, s in plan
            ]
            evaluator = Evaluator(runs[0][0])  # the cell's own backbone: a depth cell changes the model
            results = dict(zip(plan, run_all(runs, config.jobs, config.executor, config.ray_address)))
            for method in config.methods:
                seed_runs = [results[method, s] for s in config.seeds]
                where = out / "cells" / task / _slug(label)
                row = diagnose(where / f"{method}.json", evaluator, data, seed_runs)
                for merge in (m for m in config.merges if m != "seeds"):
                    runs_of = [run for (m, _), run in zip(plan, runs) if m == method]
                    row |= fl_barrier(
                        where / f"{method}-{merge}.json", evaluator, data, runs_of, merge, config.clients, row
                    )
                summary["rows"].append(row | {"task": task, "cell": label, "method": method, "overrides": cell})
            done += 1
            if config.progress:
                row = {r["method"]: r for r in summary["rows"][-len(config.methods) :]}
                print(
                    f"[{done}/{total}] {task} {label}: "
                    + ", ".join(f"{m} single {r['single']:.1f} fused {r['fused']:.1f}" for m, r in row.items()),
                    flush=True,
                )
            finish(summary, config, started)
            write_outputs(out, config.name, summary, plot, render)
    return summary


def stored(path: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The record at `path` if it was made for `key` (what it was computed from), else `key | compute()`,
    written there: an evaluated cell is read back, not measured again, while its adapters and data stay."""
    if path.exists():
        record = json.loads(path.read_text())
        if all(record.get(k) == v for k, v in key.items()):
            return record
    record = key | compute()
    write_json(path, record)
    return record


def diagnose(path: Path, evaluator: Evaluator, data, seed_runs: list) -> dict[str, Any]:
    """`pair_diagnostics` of one (task, cell, method), read back from `path` when its adapters are unchanged."""
    adapters = [str(r.adapter_dir) for r in seed_runs]

    def compute() -> dict[str, Any]:
        diagnostics = pair_diagnostics(evaluator, data, [load_adapter(a) for a in adapters])
        return {
            "diagnostics": diagnostics,
            "summary": summarise(diagnostics),
            "seconds_per_step": sum(r.seconds_per_step for r in seed_runs) / len(seed_runs),
        }

    record = stored(path, {"adapters": adapters, "validation": list(data.eval_y)}, compute)
    return record["summary"] | {"seconds_per_step": record["seconds_per_step"]}


def fl_barrier(path: Path, evaluator: Evaluator, data, runs: list, merge: str, clients: int, row: dict) -> dict:
    """LoRA's (or CopRA's) one-shot FL barrier: mean single minus the mean of each seed's FL merge (points)."""
    partition = merge.removeprefix("fl_")

    def compute() -> dict[str, Any]:
        scored = [
            evaluator.scored(one_shot_fl(c, Path(f), clients, partition), load_adapter(Path(f) / "adapter")[1], data)
            for c, f in runs
        ]
        fl = 100 * sum(s.accuracy for s in scored) / len(scored)
        return {
            "summary": {merge: fl, f"barrier_{merge}": row["single"] - fl},
            "outcomes": [outcome(s) for s in scored],
        }

    key = {"validation": list(data.eval_y), "runs": [str(f) for _, f in runs]}
    return stored(path, key, compute)["summary"]


def finish(summary: dict, config: MergeMapConfig, started: float) -> None:
    """Kept cells and the where-fit (CopRA's merge gain against LoRA's barrier), from the rows so far."""
    by = {(r["task"], r["cell"], r["method"]): r for r in summary["rows"]}
    points = []
    for (task, cell, method), row in by.items():
        if method == "lora" and (task, cell, "copra") in by:
            copra = by[task, cell, "copra"]
            points.append(
                {
                    "task": task,
                    "cell": cell,
                    "lora_barrier": row["barrier"],
                    "gain": copra["fused"] - row["fused"],
                    "single_gain": copra["single"] - row["single"],
                }
            )
    summary["where"] = {
        "points": points,
        "fit": slope([p["lora_barrier"] for p in points], [p["gain"] for p in points]),
    }
    summary["kept"] = [
        {"task": r["task"], "cell": r["cell"], "lora_barrier": r["barrier"]}
        for r in summary["rows"]
        if r["method"] == "lora" and r["barrier"] >= config.keep_barrier
    ]
    summary["wall_seconds"] = time.perf_counter() - started


def slope(x: list[float], y: list[float], confidence: float = 0.95) -> dict[str, Any] | None:
    """Least-squares slope of y on x with its t-interval (scipy.stats.linregress); None below 3 points."""
    if len(x) < 3 or len(set(x)) < 2:
        return None
    from scipy import stats

    fit = stats.linregress(x, y)
    half = stats.t.ppf(0.5 + confidence / 2, len(x) - 2) * fit.stderr
    return {
        "slope": fit.slope,
        "intercept": fit.intercept,
        "low": fit.slope - half,
        "high": fit.slope + half,
        "n": len(x),
        "r": fit.rvalue,
    }


# ----------------------------------------------------------------------------- outputs
def plot(summary: dict, path: str | Path) -> Path:
    return save_figure(draw(summary), path, dpi=110)


def draw(summary: dict):
    """Heat map of LoRA's barrier (task x cell; each box also shows CopRA's), and the where-scatter."""
    from matplotlib.figure import Figure

    rows = summary["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    by = {(r["task"], r["cell"], r["method"]): r for r in rows}
    figure = Figure(figsize=(max(8.0, 1.3 * len(cells) + 6.0), 1.0 + 0.7 * max(len(tasks), 3)), layout="constrained")
    heat, scatter = figure.subplots(1, 2, width_ratios=[max(len(cells), 1), 3])
    table = [[by[t, c, "lora"]["barrier"] if (t, c, "lora") in by else math.nan for c in cells] for t in tasks]
    image = heat.imshow(
        table, cmap="magma_r", vmin=0, vmax=max(10.0, max((v for r in table for v in r if v == v), default=0))
    )
    for i, task in enumerate(tasks):
        for j, cell in enumerate(cells):
            lora, copra = by.get((task, cell, "lora")), by.get((task, cell, "copra"))
            text = (f"L {lora['barrier']:.1f}" if lora else "") + (f"\nC {copra['barrier']:.1f}" if copra else "")
            dark = lora is not None and lora["barrier"] > 0.5 * image.norm.vmax
            heat.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    heat.set_xticks(range(len(cells)), cells, rotation=30, ha="right", fontsize=8)
    heat.set_yticks(range(len(tasks)), tasks, fontsize=8)
    heat.set_title("seed-pair fusion barrier (L: LoRA, C: CopRA)", fontsize=9)
    figure.colorbar(image, ax=heat, shrink=0.8, location="bottom", label="LoRA barrier (points)")
    points = summary.get("where", {}).get("points", [])
    scatter.scatter([p["lora_barrier"] for p in points], [p["gain"] for p in points], s=18)
    fit = summary.get("where", {}).get("fit")
    if fit:
        xs = [min(p["lora_barrier"] for p in points), max(p["lora_barrier"] for p in points)]
        scatter.plot(xs, [fit["intercept"] + fit["slope"] * x for x in xs], color="C1")
    scatter.axhline(0, color="grey", lw=0.8)
    scatter.set_xlabel("LoRA barrier (points)")
    scatter.set_ylabel("CopRA - LoRA, fused (points)")
    scatter.set_title("where does CopRA help?", fontsize=9)
    return figure


def render(summary: dict) -> str:
    c = summary["config"]
    lines = [
        f"### Merge map `{summary['name']}` (validation split, {c['validation_examples']} examples per task)",
        "",
        f"Seeds {c['seeds']} (every pair fused at 1/2), {c['shots']} shots/class, base point {c['steps']} steps, "
        f"lr {c['lr']:g}, {json.dumps(c['base'])}; {c['model']}. Barrier = mean single of a pair - fused; "
        "averaging = single - mixture; misalignment = mixture - fused; shrinkage = single - single x1/4 "
        f"(points). Wall time {summary.get('wall_seconds', 0):.0f} s.",
        "",
        "| task | cell | method | zero-shot | single | fused | mixture | barrier | averaging | misalign. "
        "| shrinkage | CE barrier | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['task']} | {r['cell']} | {r['method']} | {r['zero_shot']:.1f} | {r['single']:.1f} | {r['fused']:.1f} "
            f"| {r['mixture']:.1f} | {r['barrier']:.1f} | {r['averaging']:.1f} | {r['misalignment']:.1f} "
            f"| {r['shrinkage']:.1f} | {r['barrier_ce']:.3f} | {r['seconds_per_step']:.2f} |"
        )
    fl = [m for m in c.get("merges", []) if m != "seeds"]
    if fl:
        lines += [
            "",
            "One-shot FL merges (" + f"{c['clients']} clients from each run's init; barrier = single - merged):",
            "",
            "| task | cell | method | " + " | ".join(f"{m} | barrier" for m in fl) + " |",
            "|---|---|---|" + "---|---|" * len(fl),
        ]
        for r in summary["rows"]:
            lines.append(
                f"| {r['task']} | {r['cell']} | {r['method']} | "
                + " | ".join(f"{r[m]:.1f} | {r[f'barrier_{m}']:.1f}" for m in fl)
                + " |"
            )
    kept = summary.get("kept", [])
    lines += [
        "",
        f"Cells where LoRA's barrier is at least {c['keep_barrier']:g} points: "
        + (", ".join(f"{k['task']} {k['cell']} ({k['lora_barrier']:.1f})" for k in kept) or "none."),
    ]
    fit = summary.get("where", {}).get("fit")
    if fit:
        lines.append(
            f"CopRA's fused gain over LoRA against LoRA's barrier: slope {fit['slope']:.2f} "
            f"(95% CI {fit['low']:.2f} to {fit['high']:.2f}, {fit['n']} cells)."
        )
    lines += ["", f"![{summary['name']}]({summary['name']}.png)", ""]
    return "\n".join(lines)
