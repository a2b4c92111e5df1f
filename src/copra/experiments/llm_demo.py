"""`copra demo --model smollm2`: LoRA vs CopRA on the embedded decoder LLM, with intervals that count both noises.

SmolLM2-135M-Instruct (`embedded:smollm2`, 30 decoder blocks) scores each class by its answer's log-likelihood
(`copra.models.causal`). Per task, every adapter is scored on one fixed evaluation subset:

    zero-shot | single adapters (each method, each seed) | each seed pair fused at 1/2 | every other block pruned

Each comparison is CopRA - LoRA in accuracy points with a 95% two-level paired bootstrap
(`analysis.protocol.bootstrap_paired`) over the seeds (disjoint seed pairs for the fused adapters) and the
test examples, from each example's outcome (`Evaluator.scored`). Why not `stats.compare`'s t over seeds: two
seeds give a t-interval of +-12.7 standard errors and none of the evaluation set's noise, which dominates at
64 examples; the bootstrap's seed level is too narrow with two seeds (see `protocol`), so read the interval as
the examples' noise plus a hint of the seeds'.

Cost: a step of SmolLM2 costs about ten of MiniLM's, so the budget is small (4 shots, 30 steps at lr 2e-3, 64
examples; docs/llm-demo.md has the measured times); the expected time is printed first, from a
probe step per task (as `report.timing.probe`) and the timed zero-shot pass. Runs score themselves on one example
per class only (their own `eval_examples`: the few-shot sample does not depend on it), since every adapter is
scored here anyway. Finished runs (`runs.run_all`) and every stored outcome are reused by a demo started again.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from copra.adapters.merge import fusion
from copra.adapters.prune import structured
from copra.analysis.protocol import bootstrap_paired
from copra.core.config import TrainConfig
from copra.experiments import locked
from copra.experiments.runner import eval_cache
from copra.experiments.runner.common import (
    Evaluator,
    RunExecution,
    TrainingBudget,
    budget_config,
    check_overrides,
    check_unique,
    load_for_eval,
    lora_fields,
    run_precision,
    save_figure,
    zero_b,
)
from copra.experiments.runner.diagnostics import outcome
from copra.experiments.runner.runs import run_all
from copra.experiments.runner.state import run_state
from copra.models.evaluation import FewShotData, adapter_state, prepare_data
from copra.training.run_folder import RunResult
from copra.utils.atomic import write_json, write_text
from copra.utils.errors import UserError
from copra.utils.precision import PRECISIONS, default_device_type, resolve

METHODS = ("lora", "copra")
KINDS = {"single": "single adapter", "fused": "fused seed pair (1/2)", "pruned": "every other block pruned"}
NAME = "llm_demo"  # llm_demo.json / .md / .png in the results folder, beside the encoder demo's files
RUNS, EVALUATIONS = "llm_runs", "llm_evaluations"  # run folders (RUNS/task/method/seedS) and stored outcomes
PROBE_STEPS = 2  # optimizer steps of the timing probe per task (the first is dropped: warm-up)


@dataclass
class LLMDemoConfig(TrainingBudget, RunExecution):
    """Settings of the SmolLM2 demo (about 10 minutes on 2 bf16 CPU cores)."""

    tasks: list[str] = field(default_factory=lambda: ["covid_intents", "yahoo_answers"])  #: tasks SmolLM2 gains on
    seeds: list[int] = field(default_factory=lambda: [0, 1])  #: an even number: (seeds[0], seeds[1]), ... are fused
    shots: int = 4  #: training examples per class
    steps: int = 30  #: optimizer steps per run
    batch_size: int = 8  #: examples per step
    lr: float = 2e-3  #: peak learning rate, both methods
    eval_examples: int = 64  #: the fixed evaluation subset every adapter of a task is scored on
    model: str = "embedded:smollm2"  #: a causal LM (tests pass a tiny random Llama's folder)
    precision: str = "auto"  #: every run's and evaluation's precision (bf16 where the CPU has it)
    resamples: int = 10_000  #: bootstrap resamples per interval

    def __post_init__(self) -> None:
        check_unique("tasks", self.tasks)
        check_unique("seeds", self.seeds, minimum=2)
        if len(self.seeds) % 2:
            raise UserError(f"the LLM demo fuses disjoint seed pairs: give an even number of seeds, got {self.seeds}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        check_overrides(self.overrides)

    def run_config(self, task: str, method: str, seed: int) -> TrainConfig:
        """One run's TrainConfig (preset smollm2; `model`, `overrides` and the budget on top)."""
        return budget_config(self, task=task, method=method, seed=seed, preset="smollm2", precision=self.precision)


class Outcomes:
    """Per-example outcomes stored by content (`eval_cache.key`): a demo started again measures nothing twice."""

    def __init__(self, evaluator: Evaluator, folder: Path):
        self.evaluator, self.folder = evaluator, folder
        self._data: dict[int, tuple[FewShotData, str]] = {}

    def __call__(self, state, adapter_config: dict, data: FewShotData) -> dict:
        base, device = self.evaluator.base, default_device_type()
        if id(data) not in self._data:  # keeps `data` alive so its id is not reused
            digest = eval_cache.data_digest(data.task, data.eval_x, data.eval_y, data.prompts)
            if digest is None:
                raise UserError(f"{data.task}: the LLM demo scores text tasks only")
            self._data[id(data)] = (data, digest)
        entry = eval_cache.key(
            eval_cache.state_digest(state),
            lora_fields(adapter_config, "adapter"),
            base,
            resolve(base.precision, device),
            device,
            self._data[id(data)][1],
        )
        try:
            stored = json.loads((self.folder / f"{entry}.json").read_text(encoding="utf-8"))
            if len(stored["correct"]) == len(data.eval_y) and set(stored["correct"]) <= {"0", "1"}:
                return stored
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or unreadable: measured again
        tick = time.perf_counter()
        measured = outcome(self.evaluator.scored(state, adapter_config, data))
        measured["seconds"] = time.perf_counter() - tick
        eval_cache.record(self.folder, entry, measured["accuracy"], {**measured, "task": data.task})
        return measured


def lora_shape(c: TrainConfig) -> dict:
    """The adapter_config fields (`lora_fields`) of the LoRA a run of `c` trains: scores before any run exists."""
    return dict(
        r=c.rank,
        lora_alpha=c.lora_alpha,
        use_rslora=c.use_rslora,
        use_dora=c.use_dora,
        target_modules=list(c.target_modules),
    )


def compare(treatment: list[dict], control: list[dict], resamples: int) -> dict:
    """mean(treatment - control) in points, rows paired (same seeds), examples paired, with its 95% interval."""
    rows = [[[float(c) for c in o["correct"]] for o in side] for side in (treatment, control)]
    interval = bootstrap_paired(rows[0], rows[1], 0.95, resamples)
    points = {k: 100 * getattr(interval, k) for k in ("difference", "low", "high")}
    return points | {"verdict": interval.verdict, "rows": interval.rows, "examples": interval.examples}


@locked  # the results folder has one owner (each run folder inside is locked by `train`)
def run(config: LLMDemoConfig, log: Callable[[str], None] = print) -> dict:
    """Train (or reuse) every (task, method, seed), score every adapter, write JSON + Markdown + PNG."""
    out, seeds, started = Path(config.output_dir), config.seeds, time.perf_counter()
    data = {t: prepare_data(config.run_config(t, "lora", seeds[0])) for t in config.tasks}  # every task checked first
    keys = [(t, m, s) for t in config.tasks for m in METHODS for s in seeds]
    # a run scores itself on one example per class: every adapter is scored below, per example
    configs = {k: config.run_config(*k).replace(eval_examples=len(data[k[0]].class_names)) for k in keys}
    folders = {(t, m, s): out / RUNS / t / m / f"seed{s}" for t, m, s in keys}
    evaluator = Evaluator(config.run_config(config.tasks[0], "lora", seeds[0]))
    outcomes = Outcomes(evaluator, out / EVALUATIONS)
    shape = lora_shape(evaluator.base)
    zero_state = zero_b(adapter_state(evaluator.classifier(shape)))
    zero = {t: outcomes(zero_state, shape, data[t]) for t in config.tasks}  # its time prices the other passes
    missing = [k for k in keys if not isinstance(run_state(configs[k], folders[k]), RunResult)]
    log(expected_time(config, [configs[k] for k in missing], zero))
    plan = [(configs[k], folders[k]) for k in keys]
    results = dict(zip(keys, run_all(plan, config.jobs, config.executor, config.ray_address)))
    summary: dict = {"experiment": NAME, "config": asdict(config), "precision": run_precision(asdict(config))}
    summary["tasks"] = {t: score_task(config, t, data[t], zero[t], folders, outcomes) for t in config.tasks}
    for task, row in summary["tasks"].items():
        row["runs"] = {
            m: {
                "seconds_per_step": statistics.fmean(results[task, m, s].seconds_per_step for s in seeds),
                "active_fraction": statistics.fmean(results[task, m, s].mean_active_fraction for s in seeds),
            }
            for m in METHODS
        }
    summary |= {"trained": len(missing), "measured": evaluator.measured, "wall_seconds": time.perf_counter() - started}
    write_json(out / f"{NAME}.json", summary)
    plot(summary, out / f"{NAME}.png")
    write_text(out / f"{NAME}.md", render(summary))
    return summary


def probe_step(config: TrainConfig, steps: int = PROBE_STEPS) -> float:
    """Seconds per LoRA optimizer step of `config`, from a short run that writes nothing (`report.timing.probe`'s
    measurement; `report` sits above `experiments`, so it is not imported from here)."""
    from copra.training.loop import train

    result = train(config.replace(method="lora", steps=steps, progress=False, save_early=False, snapshot_every=0))
    timed = result.step_seconds[1:] or result.step_seconds  # the first step pays for lazy initialisation
    return sum(timed) / len(timed)


def expected_time(config: LLMDemoConfig, to_train: list[TrainConfig], zero: dict[str, dict]) -> str:
    """The line printed before training: probed LoRA steps for the runs to train, the zero-shot pass's pace
    for the evaluations (upper bounds: CopRA's skipped blocks and stored outcomes are not subtracted)."""
    training, paces = 0.0, []
    for task in config.tasks:
        runs = [r for r in to_train if r.task == task]
        if runs:
            paces.append(probe_step(runs[0]))
            training += paces[-1] * sum(r.steps for r in runs)  # every run of a task has the probed batch
    passes = 2 * len(config.seeds) + len(config.seeds) // 2  # per method and task: singles, pruned, fused pairs
    evaluation = sum(len(METHODS) * passes * zero[t].get("seconds", 0.0) for t in config.tasks)
    trained = (
        f"training {len(to_train)} runs of {config.steps} steps: {_duration(training)} at "
        f"{', '.join(f'{p:.2f}' for p in paces)} s per probed LoRA step (CopRA counted at LoRA's cost)"
        if to_train
        else "every run finished before: reused"
    )
    return (
        f"expected time: about {_duration(training + evaluation)} ({trained}; evaluation "
        f"{len(METHODS) * passes * len(config.tasks)} passes: {_duration(evaluation)} at the zero-shot pass's "
        "pace; stored outcomes are reused)"
    )


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def score_task(
    config: LLMDemoConfig, task: str, data: FewShotData, zero: dict, folders: dict, outcomes: Outcomes
) -> dict:
    """Every adapter of `task` scored per example, and CopRA - LoRA (and each method - zero-shot) with intervals."""
    row: dict = {"classes": len(data.class_names), "eval_examples": len(data.eval_y), "zero_shot": zero}
    row["train_examples"], row["methods"] = len(data.train_x), {}
    for method in METHODS:
        adapters = [load_for_eval(folders[task, method, s] / "adapter", task, config.model) for s in config.seeds]
        pairs = list(zip(adapters[0::2], adapters[1::2]))  # disjoint: independent replicates for the bootstrap
        row["methods"][method] = {
            "single": [outcomes(state, adapter_config, data) for state, adapter_config in adapters],
            "fused": [outcomes(fusion([a[0], b[0]], [0.5, 0.5]), a[1], data) for a, b in pairs],
            "pruned": [outcomes(structured(state, "every_other"), ac, data) for state, ac in adapters],
        }
    scored = row["methods"]
    row["comparisons"] = {k: compare(scored["copra"][k], scored["lora"][k], config.resamples) for k in KINDS}
    row["gains"] = {m: compare(scored[m]["single"], [zero] * len(config.seeds), config.resamples) for m in METHODS}
    return row


def mean_accuracy(outcomes: list[dict]) -> float:
    """Mean accuracy (%) over seeds or pairs."""
    return 100 * statistics.fmean(o["accuracy"] for o in outcomes)


def _interval(c: dict) -> str:
    return f"{c['difference']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]"


def table(summary: dict) -> str:
    """The headline table as Markdown (also printed by the CLI): every kind of adapter, CopRA - LoRA with its interval."""
    lines = [
        "| task | adapters | LoRA % | CopRA % | CopRA - LoRA, points [95% CI] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for task, row in summary["tasks"].items():
        for kind, label in KINDS.items():
            lora, copra = (mean_accuracy(row["methods"][m][kind]) for m in METHODS)
            first = f"{task} ({row['classes']} classes)" if kind == "single" else ""
            c = row["comparisons"][kind]
            lines.append(f"| {first} | {label} | {lora:.1f} | {copra:.1f} | {_interval(c)} | {c['verdict']} |")
    return "\n".join(lines)


def gains_table(summary: dict) -> str:
    """Each method's single adapters against zero-shot, with intervals: does SmolLM2 learn the task at all?"""
    lines = ["| task | zero-shot % | LoRA - zero-shot | CopRA - zero-shot |", "|---|---|---|---|"]
    for task, row in summary["tasks"].items():
        gains = " | ".join(_interval(row["gains"][m]) for m in METHODS)
        lines.append(f"| {task} | {100 * row['zero_shot']['accuracy']:.1f} | {gains} |")
    return "\n".join(lines)


def render(summary: dict) -> str:
    c = summary["config"]
    examples = ", ".join(f"{t} {row['eval_examples']}" for t, row in summary["tasks"].items())
    return "\n".join(
        [
            "# copra demo --model smollm2: LoRA vs CopRA on a decoder LLM",
            "",
            f"Model {_model_name(c['model'])}; classes scored by their answers' log-likelihood; LoRA on q/k/v. "
            f"{c['shots']} shots per class, {c['steps']} steps of batch {c['batch_size']}, lr {c['lr']}, "
            f"seeds {c['seeds']} (fused in disjoint pairs), precision {summary['precision']}. Accuracy (%) on a fixed "
            f"class-balanced evaluation subset ({examples} examples), mean over seeds or pairs. Intervals: two-level "
            f"paired bootstrap over seeds and examples ({c['resamples']} resamples); with "
            f"{len(c['seeds'])} seeds the seed level is narrow, so they mostly show the examples' noise.",
            "",
            table(summary),
            "",
            "Single adapters against zero-shot (points, 95% CI):",
            "",
            gains_table(summary),
            "",
            f"![accuracy by adapter kind]({NAME}.png)",
            "",
            "Seconds per training step (LoRA, CopRA) and CopRA's mean fraction of active blocks: "
            + "; ".join(
                f"{t} {r['runs']['lora']['seconds_per_step']:.2f}, {r['runs']['copra']['seconds_per_step']:.2f} s, "
                f"{r['runs']['copra']['active_fraction']:.2f}"
                for t, r in summary["tasks"].items()
            )
            + ".",
            "",
            f"Wall time: {summary['wall_seconds']:.0f} s ({summary['trained']} runs trained, "
            f"{summary['measured']} evaluations measured, the rest reused).",
        ]
    )


def _model_name(model: str) -> str:
    return "SmolLM2-135M-Instruct (`embedded:smollm2`, 30 decoder blocks)" if model == "embedded:smollm2" else model


def plot(summary: dict, path: Path) -> None:
    """Bars per task: each kind of adapter, LoRA beside CopRA, zero-shot as a dashed line."""
    from matplotlib.figure import Figure

    tasks = summary["tasks"]
    figure = Figure(figsize=(4.2 * len(tasks), 3.4), layout="constrained")
    for axes, (task, row) in zip(figure.subplots(1, len(tasks), squeeze=False)[0], tasks.items()):
        for i, method in enumerate(METHODS):
            heights = [mean_accuracy(row["methods"][method][k]) for k in KINDS]
            axes.bar([j + (i - 0.5) * 0.38 for j in range(len(KINDS))], heights, 0.38, label=method)
        axes.axhline(100 * row["zero_shot"]["accuracy"], color="grey", linestyle="--", label="zero-shot")
        axes.set_xticks(range(len(KINDS)), ["single", "fused pair", "pruned 1/2"])
        axes.set(title=task, ylabel="accuracy (%)")
    axes.legend(fontsize="small")
    save_figure(figure, path)
