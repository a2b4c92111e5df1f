"""Each method's learning rate, picked on a validation split carved from the training pool (issue 12).

Why: comparing CopRA and LoRA at one shared lr favours whichever method that lr suits (a pilot saw
LoRA fit at 1e-3 while CopRA, whose adapters are off for much of the ramp, was still undertrained).
Each method gets its own lr: every (method, lr in `lr_grid`, seed) trains on the run's few-shot
sample and is scored on `evaluation.prepare_validation`'s split (training pool minus the few-shot
sample and minus anything in the test split); the lr with the best mean validation accuracy over
seeds wins (ties: the smaller lr). The test split is never read for the choice.

Runs are kept in `output_dir/runs/val<N>/<method>/lr=<lr>/seed<s>`; a killed selection reuses the
finished ones.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from copra.core.config import METHODS, TrainConfig, make_config
from copra.experiments.runner.common import check_overrides, check_unique, new_axes, save_figure, write_outputs
from copra.utils.errors import UserError


@dataclass
class LrSelectConfig:
    """Which lrs to try for which methods, and on how many validation examples."""

    task: str = "bbc_news"  #: task to train on (its training pool also gives the validation split)
    methods: list[str] = field(default_factory=lambda: ["lora", "copra"])  #: each gets its own lr
    lr_grid: list[float] = field(default_factory=lambda: [5e-4, 1e-3, 5e-3, 1e-2])  #: peak lrs tried
    seeds: list[int] = field(default_factory=lambda: [0, 1])  #: runs per (method, lr); scores are averaged
    validation_examples: int = 200  #: validation split size (class-balanced, from the training pool)
    shots: int = 16  #: training examples per class
    steps: int = 100  #: optimizer steps per run
    batch_size: int = 16  #: examples per step
    model: str = "embedded:minilm"  #: encoder (TrainConfig.model)
    overrides: dict[str, Any] = field(default_factory=dict)  #: any other TrainConfig keys, for every run
    output_dir: str = "results/lr_select"  #: where runs, JSON and Markdown go
    progress: bool = True  #: progress bars

    def __post_init__(self) -> None:
        check_unique("methods", self.methods, METHODS)
        check_unique("lr_grid", self.lr_grid)
        check_unique("seeds", self.seeds)
        if (
            isinstance(self.validation_examples, bool)
            or not isinstance(self.validation_examples, int)
            or self.validation_examples < 1
        ):
            raise UserError(f"validation_examples must be a positive integer, got {self.validation_examples!r}")
        check_overrides(self.overrides)
        for lr in self.lr_grid:
            self.run_config(self.methods[0], lr, self.seeds[0])  # validates every TrainConfig field

    def run_config(self, method: str, lr: float, seed: int) -> TrainConfig:
        return make_config(
            {
                **self.overrides,
                **dict(
                    task=self.task,
                    method=method,
                    seed=seed,
                    lr=lr,
                    shots=self.shots,
                    steps=self.steps,
                    batch_size=self.batch_size,
                    model=self.model,
                    progress=self.progress,
                ),
            }
        )


def best_lr(scores: dict[float, list[float]]) -> float:
    """The lr with the highest mean validation score; ties go to the smaller lr."""
    return max(sorted(scores), key=lambda lr: (statistics.fmean(scores[lr]), -lr))


def validation_score(config: TrainConfig, examples: int, folder: Path) -> float:
    """Validation accuracy of one run (trained, or reused when `folder` holds it finished)."""
    from copra.experiments.runner.runs import finished
    from copra.models.evaluation import prepare_validation
    from copra.training.loop import train

    reused = finished(config, folder)  # a finished run of this config (its folder names the split size)
    return (
        reused.accuracy
        if reused is not None
        else train(config, data=prepare_validation(config, examples), output_dir=folder).accuracy
    )


def run(config: LrSelectConfig) -> dict:
    """Score every (method, lr, seed) on the validation split; the best lr per method; write the outputs."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    runs = out / "runs" / f"val{config.validation_examples}"  # another split size: other runs
    summary: dict[str, Any] = {
        "experiment": "lr_select",
        "config": asdict(config),
        "task": config.task,
        "scores": {},
        "best": {},
    }
    for method in config.methods:
        scores = {
            lr: [
                validation_score(
                    config.run_config(method, lr, seed),
                    config.validation_examples,
                    runs / method / f"lr={lr:g}" / f"seed{seed}",
                )
                for seed in config.seeds
            ]
            for lr in config.lr_grid
        }
        summary["scores"][method] = {f"{lr:g}": values for lr, values in scores.items()}
        summary["best"][method] = best_lr(scores)
    summary["wall_seconds"] = time.perf_counter() - started
    write_outputs(out, "lr_select", summary, plot, render)
    return summary


def plot(summary: dict, path: str | Path) -> Path:
    """Validation accuracy (%) against lr, one line per method, the picked lr marked."""
    figure, ax = new_axes(6, 3.6)
    for method, scores in summary["scores"].items():
        lrs = [float(lr) for lr in scores]
        (line,) = ax.plot(lrs, [100 * statistics.fmean(v) for v in scores.values()], marker="o", label=method)
        best = summary["best"][method]
        ax.plot([best], [100 * statistics.fmean(scores[f"{best:g}"])], "*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("peak lr")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(figure, path)


def render(summary: dict) -> str:
    c = summary["config"]
    methods = list(summary["scores"])
    lrs = list(summary["scores"][methods[0]]) if methods else []
    lines = [
        f"## Learning rate per method, picked on a validation split ({summary['task']})",
        "",
        f"{c['shots']} shots, {c['steps']} steps, seeds {c['seeds']}; validation accuracy (%) on "
        f"{c['validation_examples']} examples of the training pool (never the few-shot sample or the test "
        "split), mean over seeds. Best lr in bold.",
        "",
        "| lr | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for lr in lrs:
        cells = []
        for m in methods:
            text = f"{100 * statistics.fmean(summary['scores'][m][lr]):.1f}"
            cells.append(f"**{text}**" if float(lr) == summary["best"][m] else text)
        lines.append(f"| {lr} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "Picked: " + ", ".join(f"{m} lr {summary['best'][m]:g}" for m in methods), ""])
