"""Shared by the merging experiments (landscape, multitask): load adapters, evaluate states cheaply.

Why: the paper's merging results (Fig. 3 landscape, Table 1 MTL) evaluate dozens of merged adapters.
Building a model per point would dominate the run time, so `Evaluator` keeps one classifier per
LoRA shape (rank, alpha, rsLoRA, DoRA, targets) and swaps adapter states into it with `load_adapter_state`,
through exactly the modules PEFT would load a saved folder into. The classifier's LoRA settings
come from the adapter's own `adapter_config.json`, so the scaling alpha/r (or alpha/sqrt(r)) is the
one PEFT would apply; a mixture adapter (rank n*r) gets its own classifier built from `mixture_config`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from copra.adapters.io import load_adapter, read_metadata
from copra.core.config import RESERVED_KEYS, TrainConfig, make_config
from copra.experiments.runner import eval_cache
from copra.models.evaluation import (
    Batch,
    FewShotData,
    Scored,
    accuracy,
    eval_batches,
    load_adapter_state,
    score_examples,
)
from copra.utils.errors import UserError

Adapter = dict[str, torch.Tensor]
BATCH = 64  # evaluation batch size, copra.models.evaluation's default
MAX_CACHED_IMAGES = 512  # image evaluation sets up to this size keep their decoded inputs in memory


@dataclass
class TrainingBudget:
    """The TrainConfig fields an experiment gives every run it trains (defaults: the demo's budget)."""

    shots: int = 8  #: training examples per class
    steps: int = 30  #: optimizer steps per run (unless a sweep varies it)
    batch_size: int = 16  #: examples per step
    lr: float = 5e-3  #: peak learning rate (unless `lrs` names the method or a sweep varies it)
    eval_examples: int = 240  #: fixed evaluation subset
    model: str = "embedded:minilm"  #: encoder (TrainConfig.model)
    overrides: dict[str, Any] = field(default_factory=dict)  #: any other TrainConfig keys, for every run


@dataclass
class RunExecution:
    """Where an experiment writes and how its training runs execute: never part of what it computes."""

    output_dir: str = "results"  #: where adapters, JSON, PNG and Markdown go
    progress: bool = True  #: progress bars
    jobs: int = 1  #: training runs in parallel processes (finished runs in output_dir are reused)
    executor: str = (
        "local"  #: where training runs go: local (this process or `jobs` processes) or ray (one Ray task each)
    )
    ray_address: str | None = (
        None  #: Ray cluster to join (else $COPRA_RAY_ADDRESS, else a private local Ray of `jobs` CPUs)
    )


def budget_config(config: Any, **run: Any) -> TrainConfig:
    """One run's TrainConfig: the experiment's `overrides`, then its budget (`TrainingBudget` fields and
    `progress`), then what `run` says of this run (task, method, seed, the method's own lr)."""
    budget = dict(
        shots=config.shots,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        model=config.model,
        eval_examples=config.eval_examples,
        progress=config.progress,
    )
    return make_config({**config.overrides, **budget, **run})


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def check_overrides(overrides: dict[str, Any]) -> None:
    if not isinstance(overrides, dict):
        raise UserError(f"overrides must be a mapping of TrainConfig keys, got {overrides!r}")
    clash = [k for k in overrides if k in RESERVED_KEYS]
    if clash:
        raise UserError(f"overrides may not set {clash[0]!r}: the experiment sets it")


def check_unique(name: str, values: list, allowed: Iterable | None = None, minimum: int = 1) -> None:
    """UserError unless `values` is a list of at least `minimum` distinct items (from `allowed`)."""
    if not isinstance(values, (list, tuple)) or len(values) < minimum:
        raise UserError(f"{name} must list at least {minimum} item(s), got {values!r}")
    if len(set(values)) != len(values):
        raise UserError(f"{name} has duplicates: {list(values)!r}")
    if allowed is not None:
        allowed = list(allowed)
        bad = [v for v in values if v not in allowed]
        if bad:
            raise UserError(f"{name}: unknown {bad[0]!r}; choose from {allowed}")


def lora_fields(adapter_config: dict, where: str) -> dict[str, Any]:
    """TrainConfig overrides that rebuild the LoRA layers an adapter_config describes."""
    targets = adapter_config.get("target_modules")
    if not isinstance(targets, (list, tuple)) or not targets:
        raise UserError(f"{where}: target_modules must be a list of module names, got {targets!r}")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise UserError(f"{where}: per-module rank_pattern/alpha_pattern adapters cannot be evaluated here")
    return dict(
        rank=int(adapter_config["r"]),
        lora_alpha=float(adapter_config.get("lora_alpha", 8)),
        use_rslora=bool(adapter_config.get("use_rslora", False)),
        use_dora=bool(adapter_config.get("use_dora", False)),
        target_modules=sorted(targets),
    )


def load_for_eval(folder: str | Path, task: str | None = None, model: str | None = None) -> tuple[Adapter, dict]:
    """`load_adapter`, plus a check that copra's metadata (if any) names the expected task and model."""
    state, adapter_config = load_adapter(folder)
    try:
        meta = read_metadata(folder)
    except ValueError as error:
        raise UserError(f"{Path(folder) / 'copra.json'}: not valid JSON ({error})") from None
    if task is not None and meta.get("task") not in (None, task):
        raise UserError(f"{folder}: adapter was trained on task {meta['task']!r}, expected {task!r}")
    trained_on = (meta.get("config") or {}).get("model")
    if model is not None and trained_on not in (None, model):
        raise UserError(f"{folder}: adapter was trained on model {trained_on!r}, the experiment uses {model!r}")
    lora_fields(adapter_config, str(folder))  # validates what evaluation will need
    return state, adapter_config


def zero_b(state: Adapter) -> Adapter:
    """The same adapter with every B factor zero: the zero-shot model through the same modules."""
    return {k: (torch.zeros_like(v) if ".lora_B." in k or ".lora_embedding_B." in k else v) for k, v in state.items()}


def barrier(curve: list[float], alphas: list[float]) -> float:
    """Largest drop below the straight line between the endpoints (alpha=min, alpha=max); 0 if none."""
    (a0, y0), (a1, y1) = (alphas[0], curve[0]), (alphas[-1], curve[-1])
    if a1 == a0:
        return 0.0
    line = [y0 + (a - a0) / (a1 - a0) * (y1 - y0) for a in alphas]
    return max(0.0, max(on_line - y for on_line, y in zip(line, curve)))


class Evaluator:
    """Accuracy of adapter states, reusing one classifier per LoRA shape (no model rebuilt per point)."""

    def __init__(self, base: TrainConfig):
        self.base = base.replace(progress=False)
        self._classifiers: dict[tuple, nn.Module] = {}
        self._inputs: dict[int, tuple[FewShotData, list]] = {}
        self._data_keys: dict[int, tuple[FewShotData, str | None]] = {}
        self.builds = 0  # number of classifiers built (tests check reuse)
        self.measured = 0  # accuracies computed here, not read from an `eval_cache` (tests check reuse)

    def classifier(self, adapter_config: dict, where: str = "adapter") -> nn.Module:
        from copra.models import build_classifier
        from copra.training.loop import seed_everything

        fields = lora_fields(adapter_config, where)
        key = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(fields.items()))
        if key not in self._classifiers:
            seed_everything(self.base.seed)
            self._classifiers[key] = build_classifier(self.base.replace(**fields))
            self.builds += 1
        return self._classifiers[key]

    def _batches(self, classifier: nn.Module, data: FewShotData) -> list[Batch]:
        """The evaluation inputs as `copra.models.evaluation.eval_batches`, collated once per data set.

        Tokenizing or decoding images dominated tiny-model runs. Every classifier here shares the base
        model's tokenizer/processor and max_length, so the cache is per data set. Large image sets are
        not cached (memory); they are collated per evaluation.
        """
        key = id(data)
        if key in self._inputs:
            return self._inputs[key][1]
        batches = list(eval_batches(classifier, data.eval_x, BATCH))
        if self.base.backbone != "clip" or len(data.eval_x) <= MAX_CACHED_IMAGES:  # token ids are small
            self._inputs[key] = (data, batches)  # keeps `data` alive so its id is not reused
        return batches

    def accuracy(self, state: Adapter, adapter_config: dict, data: FewShotData) -> float:
        """Accuracy on `data`'s evaluation subset with `state` loaded (prompts switched if needed).

        `copra.models.evaluation.accuracy` itself (the one scoring path), with the inputs collated once.
        Inside `eval_cache.cached_evaluations` an accuracy measured before (same state, LoRA settings,
        classifier settings and data) is read back instead of measured again.
        """
        folder, entry = eval_cache.active_folder(), None
        if folder is not None:
            entry = self._cache_key(state, adapter_config, data)
            cached = eval_cache.lookup(folder, entry) if entry is not None else None
            if cached is not None:
                return cached
        classifier = self._loaded(state, adapter_config, data)
        value = accuracy(classifier, data.eval_x, data.eval_y, BATCH, self._batches(classifier, data))
        if not math.isfinite(value):
            raise UserError(f"accuracy on {data.task} is not finite (empty evaluation set?)")
        self.measured += 1
        if folder is not None and entry is not None:
            eval_cache.record(folder, entry, value, {"task": data.task, "examples": len(data.eval_y)})
        return value

    def _loaded(self, state: Adapter, adapter_config: dict, data: FewShotData) -> nn.Module:
        """The classifier of this LoRA shape with `state` loaded and `data`'s class prompts set."""
        classifier = self.classifier(adapter_config)
        if classifier.prompts != list(data.prompts):
            classifier.set_prompts(list(data.prompts))
        with torch.no_grad():
            load_adapter_state(classifier, state)
        return classifier

    def scored(self, state: Adapter, adapter_config: dict, data: FewShotData) -> Scored:
        """Per-example correctness and cross-entropy on `data`'s evaluation set (not cached: callers keep them)."""
        classifier = self._loaded(state, adapter_config, data)
        self.measured += 1
        return score_examples(classifier, data.eval_x, data.eval_y, BATCH, self._batches(classifier, data))

    def _cache_key(self, state: Adapter, adapter_config: dict, data: FewShotData) -> str | None:
        from copra.utils.precision import default_device_type, resolve

        if id(data) not in self._data_keys:  # keeps `data` alive so its id is not reused
            self._data_keys[id(data)] = (
                data,
                eval_cache.data_digest(data.task, data.eval_x, data.eval_y, data.prompts),
            )
        data_hash = self._data_keys[id(data)][1]
        if data_hash is None:
            return None
        lora = lora_fields(adapter_config, "adapter")
        device_type = default_device_type()
        return eval_cache.key(
            eval_cache.state_digest(state),
            lora,
            self.base,
            resolve(self.base.precision, device_type),
            device_type,
            data_hash,
        )


def run_precision(config: dict) -> str:
    """The precision an experiment's runs use on this machine: its TrainConfig overrides' or "auto", resolved."""
    from copra.utils.precision import resolve

    for where in (config, config.get("overrides")):
        if isinstance(where, dict) and isinstance(where.get("precision"), str):
            return resolve(where["precision"])
    return resolve("auto")


def new_axes(width: float = 7.0, height: float = 4.0):
    """(figure, axes) drawn with the Agg canvas, without pyplot's global state."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.add_subplot()


def save_figure(figure, path: str | Path, dpi: int = 120) -> Path:
    """Write `figure` as a PNG at `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def zoom_bars(axes, heights: Iterable[float]) -> None:
    """Start a bar chart's y axis just below its lowest bar: the differences are a few points, not 80."""
    heights = list(heights)
    if heights:
        axes.set_ylim(max(0.0, min(heights) - 5.0), min(100.0, max(heights) + 3.0))


def write_outputs(out: Path, name: str, summary: dict, plot, render) -> dict:
    """An experiment's three outputs side by side: `name`.json and `name`.md (atomic), `name`.png."""
    from copra.utils.atomic import write_json, write_text

    out = Path(out)
    summary.setdefault("experiment", name)  # lets `copra report` find every experiment's summary
    summary.setdefault("precision", run_precision(summary.get("config") or {}))
    write_json(out / f"{name}.json", summary)
    plot(summary, out / f"{name}.png")
    write_text(out / f"{name}.md", render(summary))
    return summary
