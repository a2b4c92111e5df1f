"""A small, plain training loop: LoRA or CopRA with the same budget (AdamW, cosine, accumulation).

One optimizer step = `grad_accum` micro-batches of `batch_size` few-shot examples. For CopRA the
gates are drawn once per optimizer step (`CopRA.step`), so all micro-batches of a step share them.
Everything is seeded by `config.seed`: few-shot sample, LoRA init, LoRA dropout, batch order, gates.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from copra.adapters import save_peft_model, write_json
from copra.config import TrainConfig
from copra.errors import UserError
from copra.evaluation import FewShotData, accuracy, adapter_state, load_adapter_state, prepare_data
from copra.gates import CopRA


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class RunResult:
    """What one run produced (also written as `copra.json` beside the adapter)."""

    config: dict
    accuracy: float
    seconds_per_step: float
    train_seconds: float
    adapter_dir: str | None = None
    early_dir: str | None = None
    early_accuracy: float | None = None
    final_loss: float | None = None
    mean_active_fraction: float = 1.0
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    masks: list[list[bool]] = field(default_factory=list)  # CopRA gates of each step (empty for LoRA)
    state: dict | None = field(default=None, repr=False)  # the trained adapter (PEFT keys), in memory only

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "state"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batches(num_examples: int, batch_size: int, seed: int):
    """Endless shuffled mini-batches of indices (a fresh permutation every epoch)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(num_examples, generator=generator).tolist()
        for start in range(0, num_examples, batch_size):
            yield order[start : start + batch_size]


def cosine_lr(step: int, total: int, peak: float, floor: float) -> float:
    """Cosine decay from `peak` at step 0 to `floor` at the last step."""
    progress = step / max(total - 1, 1)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def build_run(config: TrainConfig, data: FewShotData | None = None):
    """(classifier with fresh, seeded LoRA, data) for a run, without training."""
    from copra.models import build_classifier

    data = data or prepare_data(config)
    seed_everything(config.seed)
    classifier = build_classifier(config)
    classifier.set_prompts(list(data.prompts))
    return classifier, data


def metadata(config: TrainConfig, data: FewShotData, **results) -> dict:
    """The small JSON stored beside every adapter."""
    schedule = None
    if config.method == "copra":
        schedule = dict(initial_p=config.initial_p, final_p=config.final_p, ramp_fraction=config.ramp_fraction,
                        ramp=config.ramp, granularity=config.granularity)
    return {
        "method": config.method, "task": data.task, "seed": config.seed, "steps": config.steps,
        "shots": config.shots, "schedule": schedule, "classes": list(data.class_names),
        "config": config.to_dict(), **results,
    }


def train(config: TrainConfig, data: FewShotData | None = None, output_dir: str | Path | None = None,
          initial_state: dict[str, torch.Tensor] | None = None) -> RunResult:
    """Train one adapter and evaluate it; write it (and the early one) if `output_dir` is given.

    `initial_state` (PEFT keys) replaces the fresh LoRA init, e.g. a federated round's merged adapter.
    The trained adapter comes back in `RunResult.state`.
    """
    classifier, data = build_run(config, data)
    if initial_state is not None:
        load_adapter_state(classifier, initial_state)
    out = Path(output_dir) if output_dir is not None else None
    encoder = classifier.encoder
    gates = CopRA(encoder, config.steps, config.initial_p, config.final_p, config.ramp_fraction,
                  config.granularity, seed=config.seed, ramp=config.ramp) if config.method == "copra" else None
    if gates is not None and config.prefix_cache and hasattr(classifier, "enable_prefix_cache"):
        classifier.enable_prefix_cache(gates)
    params = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    labels = torch.tensor(data.train_y)
    order = batches(len(data.train_x), config.batch_size, config.seed)
    early_step = math.ceil(config.steps / 4) if config.save_early else None
    result = RunResult(config=config.to_dict(), accuracy=float("nan"), seconds_per_step=0.0, train_seconds=0.0)
    active = []
    classifier.train()
    bar = tqdm(range(config.steps), desc=f"{config.method} {data.task} seed {config.seed}",
               disable=not config.progress, leave=False)
    start = time.perf_counter()
    loss_value = float("nan")
    for step in bar:
        step_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, config.steps, config.lr, config.min_lr)
        if gates is not None:
            mask = gates.step(step)
            result.masks.append(mask)
            active.append(sum(mask) / len(mask))
        loss_value = 0.0
        for _ in range(config.grad_accum):
            idx = next(order)
            inputs = classifier.inputs_for([data.train_x[i] for i in idx], train=True)
            logits = classifier(**inputs)  # [B, C]
            loss = F.cross_entropy(logits, labels[idx]) / config.grad_accum
            loss.backward()
            loss_value += loss.detach().item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"loss became {loss_value} at step {step}; lower lr (now {config.lr})")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # gated-off adapters keep grad None: AdamW skips them
        result.step_seconds.append(time.perf_counter() - step_start)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if early_step is not None and step + 1 == early_step:
            result.early_accuracy, result.early_dir = _save_early(classifier, gates, data, config, out)
    result.train_seconds = time.perf_counter() - start
    result.seconds_per_step = float(np.mean(result.step_seconds))  # optimizer steps only (no early-checkpoint eval)
    result.final_loss = loss_value
    result.mean_active_fraction = float(np.mean(active)) if active else 1.0
    if gates is not None:
        gates.remove()
        classifier.prefix_cache = None
    result.accuracy = accuracy(classifier, data.eval_x, data.eval_y)
    result.state = adapter_state(classifier)
    if out is not None:
        meta = metadata(config, data, accuracy=result.accuracy, seconds_per_step=result.seconds_per_step,
                        train_seconds=result.train_seconds, final_loss=loss_value, early_accuracy=result.early_accuracy)
        result.adapter_dir = str(save_peft_model(encoder, out / "adapter", meta))
        write_json(out / "result.json", result.to_dict())
    return result


def _save_early(classifier: nn.Module, gates: CopRA | None, data: FewShotData, config: TrainConfig, out: Path | None):
    """Evaluate (all adapters on) and save the checkpoint at T/4: the paper's Early CopRA."""
    acc = accuracy(classifier, data.eval_x, data.eval_y)
    folder = None
    if out is not None:
        meta = metadata(config, data, accuracy=acc, checkpoint="early", at_step=math.ceil(config.steps / 4))
        folder = str(save_peft_model(classifier.encoder, out / "early", meta))
    classifier.train()
    return acc, folder
