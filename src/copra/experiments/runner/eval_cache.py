"""Accuracies already measured, kept on disk and looked up by content.

Why: the converged suite's landscape, pruning and crossover steps evaluate hundreds of adapter states
on up to 2000 examples each (the landscape step alone ~20-35 min). A killed step used to start its
evaluations afresh, and the `schedules` step evaluated again the snapshots the `crossover` step had
already scored (the runs are shared; their evaluations were not). Inside `cached_evaluations(folder)`
every `Evaluator.accuracy` first looks for its answer in `folder/<key>.json` and writes it there after.

The key is a SHA-256 over exactly what decides the number:
- the adapter state (every tensor's name, dtype, shape and bytes);
- the LoRA layer settings the state is loaded into (`lora_fields` of its adapter_config);
- the classifier's settings (`EVAL_IDENTITY` fields of the base config, the precision resolved) and
  the device type it runs on;
- the evaluation data (task, the examples, labels and class prompts);
- `KEY_VERSION`, raised whenever scoring changes what a number means.
Each entry is its own small file written atomically, so two processes never lose each other's
entries, and a file that cannot be read (cut short, hand-edited) is ignored and measured again.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from copra.core.config import TrainConfig
from copra.training.run_folder import CAUSAL_ONLY
from copra.utils.atomic import write_json, write_text

KEY_VERSION = 1
CACHE_TAG = "CACHEDIR.TAG"
CACHE_TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# copra's evaluation cache: accuracies by content hash; safe to delete.\n"
)
_FOLDER: ContextVar[Path | None] = ContextVar("copra_eval_cache", default=None)

# TrainConfig fields that change what a classifier scores (with the adapter state, its LoRA settings and
# the data, which are keyed separately); every other field only shapes training or where output goes.
# tests/test_eval_cache.py fails when a new TrainConfig field is in neither tuple.
EVAL_IDENTITY = ("backbone", "model", "max_length", "logit_scale", "precision")
# ... and for a decoder LLM (backbone causal) also how it scores answers; keyed only there, so the keys
# of every text and CLIP evaluation recorded before these fields existed stay valid
CAUSAL_EVAL_IDENTITY = CAUSAL_ONLY
NOT_EVAL_IDENTITY = (
    "task",
    "data_root",
    "train_file",
    "test_file",
    "text_column",
    "label_column",
    "prompt",
    "shots",
    "eval_examples",  # the data: keyed by the examples themselves
    "rank",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "target_modules",  # keyed from the adapter's own config
    "method",
    "seed",
    "lora_dropout",
    "backbone_dropout",
    "steps",
    "batch_size",
    "grad_accum",
    "lr",
    "weight_decay",
    "min_lr",
    "lr_schedule",
    "initial_p",
    "final_p",
    "ramp_fraction",
    "ramp",
    "granularity",
    "prefix_cache",
    "output_dir",
    "checkpoint_every",
    "save_early",
    "snapshot_every",
    "progress",
    "report_to",  # training only
)


@contextmanager
def cached_evaluations(folder: str | Path) -> Iterator[Path]:
    """Within this block, every `Evaluator.accuracy` reuses and records its results in `folder`."""
    path = Path(folder)
    token = _FOLDER.set(path)
    try:
        yield path
    finally:
        _FOLDER.reset(token)


def active_folder() -> Path | None:
    """The cache folder of the enclosing `cached_evaluations`, or None (nothing cached)."""
    return _FOLDER.get()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of an adapter state: names, dtypes, shapes and the exact bytes of every tensor."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_digest(task: str, examples, labels, prompts) -> str | None:
    """SHA-256 of an evaluation set; None when its examples are not plain strings (nothing is cached)."""
    if not all(isinstance(x, str) for x in examples):
        return None
    payload = json.dumps([task, list(examples), [int(y) for y in labels], list(prompts)], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def key(
    state_hash: str, lora: dict[str, Any], base: TrainConfig, precision: str, device_type: str, data_hash: str
) -> str:
    """The cache key of one accuracy: what it was measured on, with which adapter and classifier.

    `precision` is the resolved one ("auto" means bf16 on one machine, fp32 on another) and
    `device_type` where it ran: the same weights score slightly differently on a GPU.
    """
    names = EVAL_IDENTITY + (CAUSAL_EVAL_IDENTITY if base.backbone == "causal" else ())
    classifier = {name: getattr(base, name) for name in names}
    classifier.update(precision=precision, device=device_type)
    payload = json.dumps(
        {"version": KEY_VERSION, "state": state_hash, "lora": lora, "classifier": classifier, "data": data_hash},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def lookup(folder: Path, entry: str) -> float | None:
    """The accuracy recorded under `entry`, or None (absent or unreadable: it is measured again)."""
    try:
        value = json.loads((folder / f"{entry}.json").read_text(encoding="utf-8"))["accuracy"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def record(folder: Path, entry: str, accuracy: float, about: dict[str, Any]) -> None:
    """Write one accuracy (atomically; `about` says what it measured, for a reader of the folder).

    The folder is tagged as a cache (CACHEDIR.TAG, bford.info/cachedir): backup tools skip it, and so
    does the report when it looks for experiment summaries.
    """
    if not (folder / CACHE_TAG).exists():
        write_text(folder / CACHE_TAG, CACHE_TAG_TEXT)
    write_json(folder / f"{entry}.json", {"accuracy": accuracy, **about})


def is_cache(folder: Path) -> bool:
    """Whether `folder` is an evaluation cache (its files are not experiment results)."""
    return (folder / CACHE_TAG).is_file()


__all__ = [
    "CACHE_TAG",
    "CAUSAL_EVAL_IDENTITY",
    "EVAL_IDENTITY",
    "KEY_VERSION",
    "NOT_EVAL_IDENTITY",
    "active_folder",
    "cached_evaluations",
    "data_digest",
    "is_cache",
    "key",
    "lookup",
    "record",
    "state_digest",
]
