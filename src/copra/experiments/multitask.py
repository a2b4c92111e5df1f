"""Multi-task merging: fuse adapters trained on different tasks, evaluate on each (CopRA paper, Table 1 right).

Paper: Zhuang et al., "CopRA: A Progressive LoRA Training Strategy" (2024), Table 1 (MTL). One adapter
is trained per task with the same method and seed, the adapters are fused with equal weights,

    dW_f = (sum_t B_t / n)(sum_t A_t / n)

and the single merged adapter is evaluated on every task; "origin" is each task's own adapter on its
own task. Why: CopRA's random layer gating is meant to make adapters cooperative players, so their
fusion should lose less accuracy than fused plain-LoRA adapters.

This works here because the classifier is head-free: logits are cosines between the text embedding
and class-prompt embeddings of the *same* LoRA-adapted encoder, so an adapter has no task-specific
head and switching task only switches the prompts (`classifier.set_prompts`). One classifier is
reused for every evaluation (`common.Evaluator`); states are swapped in with `load_adapter_state`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from copra.adapters.align import align_many
from copra.adapters.io import load_adapter
from copra.adapters.merge import check_compatible
from copra.adapters.peft_merge import merge_states, setting_options
from copra.core.config import METHODS, PerMethodLR, TrainConfig, check_lrs
from copra.data.fewshot import prepare_shared_validation
from copra.experiments.runner.common import (
    Evaluator,
    RunExecution,
    TrainingBudget,
    budget_config,
    check_overrides,
    check_unique,
    load_for_eval,
    mean_std,
    new_axes,
    save_figure,
    write_outputs,
    zero_b,
    zoom_bars,
)
from copra.experiments.runner.diagnostics import summarise_tasks, task_merge_diagnostics
from copra.experiments.runner.runs import run_all
from copra.models.evaluation import FewShotData, prepare_data
from copra.training.run_folder import snapshot_dir, snapshot_steps
from copra.utils.errors import UserError

LABELS = {"lora": "LoRA", "copra": "CopRA"}
MANY_TASKS = 5  # above this, the figure is the per-task layout of the paper's Fig. 5c


@dataclass
class MultitaskConfig(TrainingBudget, RunExecution, PerMethodLR):
    """Settings of the multi-task merge (paper Table 1, MTL): tasks, methods, seeds, training budget."""

    tasks: list[str] = field(default_factory=lambda: ["bbc_news", "news_outlets"])  #: tasks fused ("mtl15": all 15)
    methods: list[str] = field(default_factory=lambda: ["lora", "copra"])  #: training methods compared
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  #: one adapter per (task, seed), fused per seed
    align: bool = False  #: LoRA Align every adapter to the first task's before fusing
    merge_method: str = (
        "fusion"  #: how task adapters are merged: fusion, mixture or a PEFT method (ties, dare_ties, ...)
    )
    merge_density: float = 0.5  #: density of TIES / DARE / magnitude merges (unused by the other methods)
    align_steps: int = 200  #: Adam steps of LoRA Align per module
    diagnostics: bool = (
        True  #: also the merge's controls per task (mixture, shrinkage, validated lambda; runner.diagnostics)
    )
    scales: list[float] = field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0]
    )  #: lambda grid for the fusion's update
    validation_examples: int = 200  #: per task, from the training pool, to pick lambda (never the test split)
    snapshot_curve: bool = False  #: also merge and score every snapshot the runs saved (overrides: snapshot_every), for the crossover figure
    lrs: dict[str, float] = field(default_factory=dict)  #: peak lr per method (e.g. from lr_select); others use lr
    output_dir: str = "results/multitask"  #: where adapters, JSON, PNG and Markdown go

    def __post_init__(self) -> None:
        self.tasks = expand_tasks(self.tasks)
        check_unique("tasks", self.tasks, minimum=2)
        check_unique("methods", self.methods, METHODS)
        check_unique("seeds", self.seeds)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise UserError(f"seeds must be integers, got {self.seeds!r}")
        if not isinstance(self.align, bool):
            raise UserError(f"align must be true or false, got {self.align!r}")
        if isinstance(self.align_steps, bool) or not isinstance(self.align_steps, int) or self.align_steps < 0:
            raise UserError(f"align_steps must be a non-negative integer, got {self.align_steps!r}")
        setting_options(self.merge_method, self.merge_density)
        check_overrides(self.overrides)
        if not isinstance(self.diagnostics, bool):
            raise UserError(f"diagnostics must be true or false, got {self.diagnostics!r}")
        check_unique("scales", self.scales)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in self.scales):
            raise UserError(f"scales must be positive numbers, got {self.scales!r}")
        if (
            isinstance(self.validation_examples, bool)
            or not isinstance(self.validation_examples, int)
            or (self.validation_examples < 1)
        ):
            raise UserError(f"validation_examples must be a positive integer, got {self.validation_examples!r}")
        if not isinstance(self.snapshot_curve, bool):
            raise UserError(f"snapshot_curve must be true or false, got {self.snapshot_curve!r}")
        if self.snapshot_curve and not self.overrides.get("snapshot_every"):
            raise UserError("snapshot_curve needs runs that save snapshots: set overrides.snapshot_every")
        check_lrs(self.lrs, self.methods)
        self.run_config(self.tasks[0], self.methods[0], self.seeds[0])  # validates every TrainConfig field

    def run_config(self, task: str, method: str, seed: int) -> TrainConfig:
        return budget_config(self, task=task, method=method, seed=seed, lr=self.lr_of(method))


def expand_tasks(tasks: list[str]) -> list[str]:
    """``mtl15`` (alone or in a list) stands for the 15 embedded text tasks of the paper's Fig. 5c."""
    if isinstance(tasks, str):  # MultitaskConfig(tasks="mtl15") in code; --set already gives a list
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, (list, tuple)):
        return tasks
    from copra.data.text_tasks import MTL15

    return [name for t in tasks for name in (MTL15 if t == "mtl15" else [t])]


def run(config: MultitaskConfig) -> dict:
    """Train one adapter per (method, seed, task), fuse per (method, seed), evaluate; writes the outputs."""
    out = Path(config.output_dir)
    data = {t: prepare_data(config.run_config(t, config.methods[0], config.seeds[0])) for t in config.tasks}
    keys = [(m, s, t) for m in config.methods for s in config.seeds for t in config.tasks]
    plan = [(config.run_config(t, m, s), out / "runs" / t / m / f"seed{s}") for m, s, t in keys]
    adapters: dict[str, list[dict[str, str]]] = {m: [{} for _ in config.seeds] for m in config.methods}
    for (method, seed, task), result in zip(keys, run_all(plan, config.jobs, config.executor, config.ray_address)):
        adapters[method][config.seeds.index(seed)][task] = result.adapter_dir
    return run_from_adapters(adapters, config, data)


def run_from_adapters(
    adapters: dict[str, list[dict[str, str]]], config: MultitaskConfig, data: dict[str, FewShotData] | None = None
) -> dict:
    """Fuse and evaluate given adapter folders {method: [{task: folder, ...} per seed, ...]}."""
    started = time.perf_counter()
    if not adapters or any(not groups for groups in adapters.values()):
        raise UserError("run_from_adapters needs at least one {task: folder} group per method")
    tasks = list(config.tasks)
    loaded: dict[str, dict[str, tuple[dict, dict]]] = {}
    for method, groups in adapters.items():
        for n, group in enumerate(groups):
            if sorted(group) != sorted(tasks):
                raise UserError(
                    f"{method} group {n}: needs one adapter folder for each of {tasks}, got {sorted(group)}"
                )
            states = {t: load_for_eval(group[t], t, config.model) for t in tasks}
            try:
                check_compatible([states[t][0] for t in tasks], [states[t][1] for t in tasks])
            except UserError as error:
                raise UserError(f"{method} group {n} ({', '.join(str(group[t]) for t in tasks)}): {error}") from None
            loaded[f"{method}/{n}"] = states
    base = config.run_config(tasks[0], next(iter(adapters)), config.seeds[0])
    data = data or {t: prepare_data(config.run_config(t, next(iter(adapters)), config.seeds[0])) for t in tasks}
    evaluator = Evaluator(base)
    bar = tqdm(
        total=sum(len(g) for g in adapters.values()) * 2 * len(tasks) + len(tasks),
        leave=False,
        disable=not config.progress,
        desc="multitask",
    )
    first_state, first_config = next(iter(loaded.values()))[tasks[0]]
    summary: dict[str, Any] = {"config": asdict(config), "tasks": tasks, "zero_shot": {}, "methods": {}}
    for task in tasks:  # B = 0: the encoder without adaptation, through the same classifier
        summary["zero_shot"][task] = evaluator.accuracy(zero_b(first_state), first_config, data[task])
        bar.update(1)
    validation = None
    if config.diagnostics:
        method0 = next(iter(adapters))
        validation = {
            t: prepare_shared_validation(
                [config.run_config(t, method0, s) for s in config.seeds], config.validation_examples
            )
            for t in tasks
        }
    for method, groups in adapters.items():
        runs = []
        for n, group in enumerate(groups):
            states = loaded[f"{method}/{n}"]
            merged, merged_config = merge_tasks(states, config)
            record = {"adapters": {t: str(group[t]) for t in tasks}, "original": {}, "merged": {}}
            for task in tasks:
                state, adapter_config = states[task]
                record["original"][task] = evaluator.accuracy(state, adapter_config, data[task])
                record["merged"][task] = evaluator.accuracy(merged, merged_config, data[task])
                bar.update(2)
            if validation is not None:
                record["diagnostics"] = task_merge_diagnostics(evaluator, data, states, config.scales, validation)
            runs.append(record)
        row: dict[str, Any] = {"runs": runs}
        if validation is not None:
            row["diagnostics"] = summarise_tasks([r["diagnostics"] for r in runs])
        for kind in ("original", "merged"):
            row[kind] = {t: dict(zip(("mean", "std"), mean_std(r[kind][t] for r in runs))) for t in tasks}
            row[kind]["average"] = dict(
                zip(("mean", "std"), mean_std(sum(r[kind][t] for t in tasks) / len(tasks) for r in runs))
            )
        summary["methods"][method] = row
    bar.close()
    if config.snapshot_curve:
        summary["curve"] = snapshot_curve(summary, config, evaluator, data)
    summary["classifiers_built"] = evaluator.builds
    summary["wall_seconds"] = time.perf_counter() - started
    out = Path(config.output_dir)
    write_outputs(out, "multitask", summary, plot, render)
    return summary


def merge_tasks(states: dict[str, tuple[dict, dict]], config: MultitaskConfig) -> tuple[dict, dict]:
    """One seed's task adapters {task: (state, adapter_config)} merged as configured (aligned first if asked)."""
    tasks = list(states)
    parts = [states[t][0] for t in tasks]
    if config.align:
        parts = [parts[0], *align_many(parts[0], parts[1:], steps=config.align_steps)]
    return merge_states(
        config.merge_method,
        parts,
        [states[t][1] for t in tasks],
        **setting_options(config.merge_method, config.merge_density),
    )


def snapshot_curve(summary: dict, config: MultitaskConfig, evaluator: Evaluator, data: dict[str, FewShotData]) -> dict:
    """Merged accuracy (mean over tasks) per method and seed at every snapshot step all runs saved, and at the end.

    {"steps": [...], "merged": {method: [step][seed]}}: CopRA − LoRA against training length for the
    crossover figure. A snapshot at step t is the adapter t steps into a run of the full length.
    """
    tasks = summary["tasks"]
    folders = {
        m: [{t: Path(r["adapters"][t]).parent for t in tasks} for r in row["runs"]]
        for m, row in summary["methods"].items()
    }
    saved = [
        set(snapshot_steps(folder)) for groups in folders.values() for group in groups for folder in group.values()
    ]
    steps = sorted(set.intersection(*saved)) if saved else []
    curve: dict[str, Any] = {"steps": [*steps, config.steps], "merged": {m: [] for m in folders}}
    bar = tqdm(
        total=len(steps) * sum(len(groups) for groups in folders.values()) * len(tasks),
        leave=False,
        disable=not config.progress,
        desc="multitask snapshots",
    )
    for step in steps:
        for method, groups in folders.items():
            row = []
            for group in groups:
                states = {t: load_adapter(snapshot_dir(group[t], step)) for t in tasks}
                merged, merged_config = merge_tasks(states, config)
                row.append(sum(evaluator.accuracy(merged, merged_config, data[t]) for t in tasks) / len(tasks))
                bar.update(len(tasks))
            curve["merged"][method].append(row)
    bar.close()
    for method, row in summary["methods"].items():  # the end of training: the adapters merged above
        curve["merged"][method].append([sum(r["merged"][t] for t in tasks) / len(tasks) for r in row["runs"]])
    return curve


def plot(summary: dict, path: str | Path) -> Path:
    """Grouped bars per task: original vs merged accuracy (%) for each method, std as error bars.

    More than ``MANY_TASKS`` tasks (MTL15) get the paper's Fig. 5c layout instead (`plot_per_task`).
    """
    tasks = summary["tasks"]
    if len(tasks) > MANY_TASKS:
        return plot_per_task(summary, path)
    bars = [(m, k) for m in summary["methods"] for k in ("original", "merged")]
    figure, ax = new_axes(max(6.0, 1.8 * len(tasks) + 3), 4.0)
    width = 0.8 / len(bars)
    for i, (method, kind) in enumerate(bars):
        cells = [summary["methods"][method][kind][t] for t in tasks]
        xs = [x - 0.4 + width * (i + 0.5) for x in range(len(tasks))]
        ax.bar(
            xs,
            [100 * c["mean"] for c in cells],
            width,
            yerr=[100 * c["std"] for c in cells],
            capsize=2,
            color=f"C{i // 2}",
            alpha=1.0 if kind == "original" else 0.5,
            hatch=None if kind == "original" else "//",
            label=f"{LABELS.get(method, method)} {'origin' if kind == 'original' else 'merge'}",
        )
    ax.hlines(
        [100 * summary["zero_shot"][t] for t in tasks],
        [x - 0.45 for x in range(len(tasks))],
        [x + 0.45 for x in range(len(tasks))],
        colors="k",
        linestyles="--",
        label="zero-shot",
        zorder=3,
    )
    zoom_bars(
        ax,
        [100 * summary["methods"][m][k][t]["mean"] for m, k in bars for t in tasks]
        + [100 * summary["zero_shot"][t] for t in tasks],
    )
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy (%)")
    method = summary["config"].get("merge_method", "fusion")
    ax.set_title(f"Task adapters merged ({method}, equal weights), evaluated on each task")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(figure, path)


def plot_per_task(summary: dict, path: str | Path) -> Path:
    """Fig. 5c: per task (and the average), a bar per method's fused adapter (std over seeds), a ring per
    method's own task adapter, a dash for zero-shot; tasks on a rotated axis so 15 stay readable."""
    tasks = [*summary["tasks"], "average"]
    methods = list(summary["methods"])
    zero = [100 * summary["zero_shot"][t] for t in summary["tasks"]]
    zero.append(sum(zero) / len(zero))
    figure, ax = new_axes(max(8.0, 0.75 * len(tasks) + 2), 4.5)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        row = summary["methods"][method]
        xs = [x - 0.4 + width * (i + 0.5) for x in range(len(tasks))]
        ax.bar(
            xs,
            [100 * row["merged"][t]["mean"] for t in tasks],
            width,
            yerr=[100 * row["merged"][t]["std"] for t in tasks],
            capsize=2,
            color=f"C{i}",
            label=f"{LABELS.get(method, method)} fused",
        )
        ax.scatter(
            xs,
            [100 * row["original"][t]["mean"] for t in tasks],
            s=30,
            facecolors="none",
            edgecolors=f"C{i}",
            linewidths=1.5,
            zorder=3,
            label=f"{LABELS.get(method, method)} own adapter",
        )
    ax.scatter(range(len(tasks)), zero, marker="_", s=300, color="k", zorder=4, label="zero-shot")
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{len(tasks) - 1} task adapters fused (equal weights), accuracy on each task")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(methods) + 1)
    return save_figure(figure, path)


def table(summary: dict) -> str:
    """Markdown: rows origin/merge x method, columns tasks + average, accuracy (%) mean ± std over seeds."""
    tasks = summary["tasks"]
    if len(tasks) > MANY_TASKS:
        return table_per_task(summary)
    lines = [
        "| | method | " + " | ".join(tasks) + " | average |",
        "|---" * (len(tasks) + 3) + "|",
        "| zero-shot | – | " + " | ".join(f"{100 * summary['zero_shot'][t]:.1f}" for t in tasks) + " | "
        f"{100 * sum(summary['zero_shot'].values()) / len(tasks):.1f} |",
    ]
    for kind, label in (("original", "origin"), ("merged", "merge")):
        for method, row in summary["methods"].items():
            cells = [row[kind][t] for t in [*tasks, "average"]]
            lines.append(
                f"| {label} | {LABELS.get(method, method)} | "
                + " | ".join(f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}" for c in cells)
                + " |"
            )
    return "\n".join(lines)


def table_per_task(summary: dict) -> str:
    """Markdown for many tasks (MTL15): one row per task, columns zero-shot and origin/merge per method."""
    tasks, methods = summary["tasks"], list(summary["methods"])
    kinds = [(k, m) for k in ("original", "merged") for m in methods]
    head = (
        "| task | zero-shot | "
        + " | ".join(f"{'origin' if k == 'original' else 'merge'} {LABELS.get(m, m)}" for k, m in kinds)
        + " |"
    )
    lines = [head, "|---" * (len(kinds) + 2) + "|"]
    zero = dict(summary["zero_shot"], average=sum(summary["zero_shot"].values()) / len(tasks))
    for t in [*tasks, "average"]:
        cells = [summary["methods"][m][k][t] for k, m in kinds]
        lines.append(
            f"| {t} | {100 * zero[t]:.1f} | "
            + " | ".join(f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}" for c in cells)
            + " |"
        )
    return "\n".join(lines)


def diagnostics_table(summary: dict) -> list[str]:
    """Markdown lines: the fusion's controls per method (means over seeds and tasks), or none without them."""
    rows = {m: r["diagnostics"] for m, r in summary["methods"].items() if "diagnostics" in r}
    if not rows:
        return []
    n = len(summary["tasks"])
    lines = [
        f"Why the fusion at 1/{n} loses what it loses (accuracy in %, means over seeds and tasks; barrier = own - fused "
        f"= averaging (own - mixture) + misalignment (mixture - fused); shrinkage = own - own x 1/{n * n}; "
        "scaled: the fusion's update times the lambda best on validation):",
        "",
        "| method | own | fused | mixture | own x share | barrier | averaging | misalign. | shrinkage | CE barrier "
        "| scaled (lambda) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, d in rows.items():
        scaled = f"{d['scaled']:.1f} ({d['scale']:g})" if "scaled" in d else "–"
        lines.append(
            f"| {LABELS.get(method, method)} | {d['own']:.1f} | {d['fused']:.1f} | {d['mixture']:.1f} | "
            f"{d['fused_share']:.1f} | {d['barrier']:.1f} | {d['averaging']:.1f} | {d['misalignment']:.1f} | "
            f"{d['shrinkage']:.1f} | {d['barrier_ce']:.3f} | {scaled} |"
        )
    return [*lines, ""]


def render(summary: dict) -> str:
    c = summary["config"]
    return "\n".join(
        [
            "# Multi-task merging (CopRA paper, Table 1 right)",
            "",
            f"One adapter per task ({', '.join(summary['tasks'])}) and seed ({c['seeds']}), {c['shots']} shots, "
            f"{c['steps']} steps, model {c['model']}. *origin*: each task's own adapter on its task; *merge*: the "
            f"equal-weight {c.get('merge_method', 'fusion')} merge of all task adapters"
            f"{' after LoRA Align' if c['align'] else ''}, evaluated on every "
            "task with that task's class prompts. Accuracy (%) on fixed evaluation subsets, mean ± std over seeds.",
            "",
            table(summary),
            "",
            *diagnostics_table(summary),
            "![multitask](multitask.png)",
            "",
        ]
    )
