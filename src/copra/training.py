"""A small, plain training loop: LoRA or CopRA with the same budget (AdamW, cosine, accumulation).

One optimizer step = `grad_accum` micro-batches of `batch_size` few-shot examples. For CopRA the
gates are drawn once per optimizer step (`CopRA.step`), so all micro-batches of a step share them.
Everything is seeded by `config.seed`: few-shot sample, LoRA init, LoRA dropout, batch order, gates.

Crash safety: with an output folder, `train` checkpoints every `checkpoint_every` steps (parameters,
AdamW state, RNG states and progress; `copra.checkpoint`) and `train(..., resume=True)` continues a
killed run to the very adapter an uninterrupted run gives. The batch order is replayed to the
checkpoint's step and the gates depend only on (seed, step), so neither needs saved state.
A NaN/inf loss or weight stops the run (TrainingDiverged) before anything bad is written.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from copra.adapters import load_adapter, save_peft_model, write_json
from copra.checkpoint import (CHECKPOINTS_DIR, STATE_FILE, Checkpoint, latest_checkpoint, load_checkpoint,
                              load_optimizer_state, optimizer_state, remove_checkpoints, remove_leftovers,
                              rng_state, save_checkpoint, set_rng_state)
from copra.config import TrainConfig
from copra.errors import ResourceError, UserError
from copra.evaluation import FewShotData, accuracy, adapter_state, load_adapter_state, prepare_data
from copra.gates import CopRA
from copra.locks import folder_lock
from copra.stats import plateau
from copra.precision import grad_scaler
from copra.precision import resolve as resolve_precision
from copra.schedule import learning_rate


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
    losses: list[float] = field(default_factory=list)  # training loss of each optimizer step
    masks: list[list[bool]] = field(default_factory=list)  # CopRA gates of each step (empty for LoRA)
    resumed_from: int | None = None  # the step a resumed run continued from (steps: it had already finished)
    converged: bool | None = None  # the training loss plateaued (copra.stats.plateau); None: too short to tell
    plateau: dict | None = None  # the plateau test's statistic: window, improvement, last_mean, threshold
    precision: str | None = None  # the precision the run used ("fp32", "bf16", "fp16"; config "auto" resolved)
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
    return learning_rate(step, total, peak, floor)


def lr_at(step: int, config: TrainConfig) -> float:
    """The run's lr at `step`: the paper's cosine, or `config.lr_schedule` (see `copra.schedule`)."""
    if config.lr_schedule == "cosine":
        return cosine_lr(step, config.steps, config.lr, config.min_lr)
    return learning_rate(step, config.steps, config.lr, config.min_lr, config.lr_schedule, config.ramp_fraction)


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
          initial_state: dict[str, torch.Tensor] | None = None, resume: bool = False) -> RunResult:
    """Train one adapter and evaluate it; write it (and the early one) if `output_dir` is given.

    `initial_state` (PEFT keys) replaces the fresh LoRA init, e.g. a federated round's merged adapter.
    The trained adapter comes back in `RunResult.state`.

    With `output_dir`, a checkpoint is written every `config.checkpoint_every` steps (atomically, see
    `copra.checkpoint`) and deleted once the final adapter and `result.json` are written.
    `resume=True` continues from the newest checkpoint there (its config must equal `config` up to
    `RESUME_IGNORED`), so the final adapter is bit-identical to an uninterrupted run; with no
    checkpoint it starts at step 0, and a finished run (`result.json`) is returned as it is.

    The run holds `output_dir`'s lock (`copra.locks`) throughout: FolderInUse if another process has
    it. A full disk, a permission / read-only error, a deleted folder or running out of memory is one
    UserError line that names the path or the batch size and where the last good checkpoint is.
    """
    out = Path(output_dir) if output_dir is not None else None
    precision = resolve_precision(config.precision)  # fp16 on a CPU: one error line before anything is written
    if resume and out is None:
        raise UserError("resuming needs the output folder that holds the checkpoint")
    if out is not None:
        check_writable(out)
    with folder_lock(out) if out is not None else nullcontext():  # one owner per run folder (re-entrant)
        try:
            return _train(config, data, out, initial_state, resume, precision)
        except ResourceError as error:
            if out is None:
                raise
            raise ResourceError(f"{error}; {_kept(out)}") from None
        except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
            if not isinstance(error, MemoryError) and not _out_of_memory(error):
                raise
            raise UserError(f"out of memory training {config.method} on {config.task} with batch_size "
                            f"{config.batch_size} (max_length {config.max_length}): lower batch_size and raise "
                            f"grad_accum to keep the effective batch; {_kept(out)}") from None


def _train(config: TrainConfig, data: FewShotData | None, out: Path | None,
           initial_state: dict[str, torch.Tensor] | None, resume: bool, precision: str) -> RunResult:
    checkpoint = None
    if resume:
        point = resume_point(out, config)
        if isinstance(point, RunResult):
            return point
        checkpoint = point
        if checkpoint is not None and checkpoint.state.get("precision", precision) != precision:
            raise UserError(f"{checkpoint.folder} was trained in {checkpoint.state['precision']}, but this machine runs "
                            f"precision={config.precision} as {precision}; set precision to match or use --force")
    classifier, data = build_run(config, data)
    if initial_state is not None:
        load_adapter_state(classifier, initial_state)
    encoder = classifier.encoder
    gates = CopRA(encoder, config.gate_schedule(), granularity=config.granularity,
                  seed=config.seed) if config.method == "copra" else None
    if gates is not None and config.prefix_cache and hasattr(classifier, "enable_prefix_cache"):
        classifier.enable_prefix_cache(gates)
    named = [(n, p) for n, p in classifier.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    accelerator = make_accelerator()
    model, optimizer = accelerator.prepare(classifier, optimizer)  # `model` is DDP-wrapped under `accelerate launch`
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if not accelerator.is_main_process:
        out = None  # one process writes adapters, snapshots and checkpoints
    labels = torch.tensor(data.train_y)
    order = batches(len(data.train_x), config.batch_size, config.seed)
    early_step = math.ceil(config.steps / 4) if config.save_early else None
    result = RunResult(config=config.to_dict(), accuracy=float("nan"), seconds_per_step=0.0, train_seconds=0.0,
                       precision=precision)
    scaler = grad_scaler(precision, device.type)  # fp16 only
    first_step, previous_seconds, last_checkpoint = 0, 0.0, None
    if checkpoint is not None:
        first_step, previous_seconds = _restore(checkpoint, named, optimizer, gates, result, scaler)
        last_checkpoint = checkpoint.folder
        for _ in range(first_step * config.grad_accum):  # the batch order continues where it stopped
            next(order)
    elif out is not None:
        _clear_run(out)  # an earlier run's checkpoints and result.json no longer describe this folder
    result.resumed_from = first_step if checkpoint is not None else None
    classifier.train()
    bar = tqdm(range(first_step, config.steps), desc=f"{config.method} {data.task} seed {config.seed}",
               disable=not config.progress, leave=False, initial=first_step, total=config.steps)
    start = time.perf_counter()
    loss_value = result.losses[-1] if result.losses else float("nan")
    for step in bar:
        step_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        if gates is not None:
            result.masks.append(gates.step(step))
        loss_value = 0.0
        for _ in range(config.grad_accum):
            idx = next(order)[rank::world]  # data parallel: each process takes its share of the batch
            inputs = classifier.inputs_for([data.train_x[i] for i in idx], train=True)
            logits = model(**{k: v.to(device) for k, v in inputs.items()})  # [B, C]
            loss = F.cross_entropy(logits, labels[idx].to(device)) / config.grad_accum  # fp32 logits and loss
            accelerator.backward(scaler.scale(loss) if scaler is not None else loss)
            # every process sees the same loss, so all of them stop together on NaN
            loss_value += (accelerator.reduce(loss.detach(), "mean") if world > 1 else loss.detach()).item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(_diverged(f"loss became {loss_value} at step {step}", config, last_checkpoint))
        try:
            if scaler is not None:  # skips the step when fp16 gradients overflowed, then adapts the scale
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        except RuntimeError as error:  # e.g. lr / (1 - beta1) beyond float range
            if "overflow" not in str(error):
                raise
            raise TrainingDiverged(_diverged(f"the optimizer step overflowed at step {step}", config, last_checkpoint)) from None
        optimizer.zero_grad(set_to_none=True)  # gated-off adapters keep grad None: AdamW skips them
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise TrainingDiverged(_diverged(f"adapter weights became NaN or inf at step {step}", config, last_checkpoint))
        result.step_seconds.append(time.perf_counter() - step_start)
        result.losses.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        done = step + 1
        if early_step is not None and done == early_step:
            result.early_accuracy, result.early_dir = _save_early(classifier, gates, data, config, out)
        if out is not None and config.snapshot_every and done % config.snapshot_every == 0 and done < config.steps:
            # learning curves (paper Fig. 6c): the adapter as it is at this step, all adapters on
            save_peft_model(encoder, out / SNAPSHOTS_DIR / f"step-{done}",
                            metadata(config, data, checkpoint="snapshot", at_step=done))
        if out is not None and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            seconds = previous_seconds + time.perf_counter() - start
            last_checkpoint = _save_checkpoint(out, done, named, optimizer, gates, result, seconds, scaler)
    result.train_seconds = previous_seconds + time.perf_counter() - start
    result.seconds_per_step = float(np.mean(result.step_seconds))  # optimizer steps only (no early-checkpoint eval)
    result.final_loss = loss_value
    result.plateau = plateau(result.losses).to_dict()
    result.converged = result.plateau["converged"]
    active = [sum(mask) / len(mask) for mask in result.masks]
    result.mean_active_fraction = float(np.mean(active)) if active else 1.0
    if gates is not None:
        gates.remove()
        classifier.prefix_cache = None
    result.accuracy = accuracy(classifier, data.eval_x, data.eval_y)
    result.state = adapter_state(classifier)
    if out is not None:
        meta = metadata(config, data, accuracy=result.accuracy, precision=precision, seconds_per_step=result.seconds_per_step,
                        train_seconds=result.train_seconds, final_loss=loss_value, early_accuracy=result.early_accuracy)
        result.adapter_dir = str(save_peft_model(encoder, out / "adapter", meta))
        write_json(out / RESULT_FILE, result.to_dict())  # written last: marks the run finished
        remove_checkpoints(out / CHECKPOINTS_DIR)
        remove_leftovers(out)
    return result


def make_accelerator():
    """Hugging Face Accelerate: a no-op wrapper in one process, data-parallel DDP under `accelerate launch`.

    Gated-off adapters get no gradient in a step, so DDP must not wait for them
    (find_unused_parameters); every process draws the same gates, seeded by (seed, step).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


# ----------------------------------------------------------------------------- output folder and resume

RESULT_FILE = "result.json"
SNAPSHOTS_DIR = "snapshots"  # adapters saved every `snapshot_every` steps
# config fields that may differ between a checkpoint and the run resuming it (they change no number)
RESUME_IGNORED = ("progress", "output_dir", "checkpoint_every")


def check_writable(out: Path) -> None:
    """UserError now (before any training) if `out` can never become a writable folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a folder")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"output_dir {out} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK):
        why = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "no permission"
        raise UserError(f"output_dir {out} cannot be written: {why} in {existing}")


def check_fresh_output(out: str | Path) -> None:
    """UserError if `out` already holds something (the CLI's guard without --resume / --force)."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        kind = "a finished run" if (out / RESULT_FILE).exists() else (
            "an unfinished run" if latest_checkpoint(out / CHECKPOINTS_DIR) else "files")
        raise UserError(f"output_dir {out} already holds {kind}; pass --resume to continue or reuse it, "
                        "or --force to start over")
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a folder")


# Fields added after runs were first recorded, with the value those older runs in effect used (when
# it is not the field's default): a run recorded before a field existed is the same run only then.
RECORDED_BEFORE = {"precision": "fp32"}


def same_run(stored: dict, config: TrainConfig, where: Path) -> None:
    """UserError naming the first field where a stored run config differs from `config`.

    A field the stored config lacks reads as what runs before that field used (`RECORDED_BEFORE`,
    else the field's default), so finished runs stay reusable when TrainConfig gains a field."""
    if not isinstance(stored, dict):
        raise UserError(f"{where}: holds no run config")
    mine = config.to_dict()
    before = TrainConfig.defaults() | RECORDED_BEFORE
    for key in sorted(set(stored) | set(mine)):
        if key in RESUME_IGNORED:
            continue
        theirs = stored.get(key, before.get(key, "<unset>"))
        if key not in mine or theirs != mine[key]:
            raise UserError(f"{where} belongs to a run with {key}={theirs!r}, but this run has "
                            f"{key}={mine.get(key, '<unset>')!r}; resume with the same config or use --force to start over")


def resume_point(out: Path, config: TrainConfig) -> "RunResult | Checkpoint | None":
    """What `--resume` continues from: the finished run, the newest checkpoint, or None (start at step 0)."""
    remove_leftovers(out)
    remove_leftovers(out / CHECKPOINTS_DIR)
    result_file = out / RESULT_FILE
    if result_file.is_file() and (out / "adapter").is_dir():
        try:
            stored = json.loads(result_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise UserError(f"{result_file}: not valid JSON ({error}); use --force to start over") from None
        same_run(stored.get("config") if isinstance(stored, dict) else None, config, result_file)
        names = {f.name for f in fields(RunResult)} - {"state"}
        result = RunResult(**{k: v for k, v in stored.items() if k in names})
        result.state, _ = load_adapter(out / "adapter")
        result.resumed_from = config.steps
        remove_checkpoints(out / CHECKPOINTS_DIR)
        return result
    folder = latest_checkpoint(out / CHECKPOINTS_DIR)
    if folder is None:
        return None
    checkpoint = load_checkpoint(folder)
    same_run(checkpoint.state.get("config"), config, folder / STATE_FILE)
    if not 1 <= checkpoint.step < config.steps:
        raise UserError(f"{folder}: step {checkpoint.step} is outside 1..{config.steps - 1}")
    return checkpoint


def _clear_run(out: Path) -> None:
    remove_leftovers(out)
    shutil.rmtree(out / SNAPSHOTS_DIR, ignore_errors=True)
    remove_checkpoints(out / CHECKPOINTS_DIR)
    (out / RESULT_FILE).unlink(missing_ok=True)


def _save_checkpoint(out: Path, step: int, named, optimizer, gates: CopRA | None, result: RunResult,
                     seconds: float, scaler=None) -> Path:
    tensors = {f"param.{name}": p.detach() for name, p in named}
    if gates is not None:  # reseeded from (seed, step) at every step anyway; kept for inspection
        tensors["rng.gates"] = gates.state_dict()["generator"]
    optim_tensors, optim_json = optimizer_state(optimizer)
    rng_tensors, rng_json = rng_state()
    state = {
        "config": result.config, "optimizer": optim_json, "rng": rng_json, "train_seconds": seconds,
        "losses": result.losses, "step_seconds": result.step_seconds, "masks": result.masks,
        "early_accuracy": result.early_accuracy, "early_dir": result.early_dir, "precision": result.precision,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    return save_checkpoint(out / CHECKPOINTS_DIR, step, {**tensors, **optim_tensors, **rng_tensors}, state)


def _restore(checkpoint: Checkpoint, named, optimizer, gates: CopRA | None, result: RunResult,
             scaler=None) -> tuple[int, float]:
    """Parameters, optimizer, RNG states and progress from `checkpoint`; (first step, seconds so far)."""
    state, tensors, step = checkpoint.state, checkpoint.tensors, checkpoint.step
    try:
        with torch.no_grad():
            for name, param in named:
                saved = tensors[f"param.{name}"]
                if saved.shape != param.shape or saved.dtype != param.dtype:
                    raise ValueError(f"parameter {name!r} is {tuple(saved.shape)} {saved.dtype} in the checkpoint, "
                                     f"{tuple(param.shape)} {param.dtype} in the model")
                param.copy_(saved)
        load_optimizer_state(optimizer, tensors, state["optimizer"])
        set_rng_state(tensors, state["rng"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if gates is not None and "rng.gates" in tensors:
            gates.load_state_dict({"generator": tensors["rng.gates"], "mask": None, "explicit": False})
        result.losses = [float(v) for v in state["losses"]]
        result.step_seconds = [float(v) for v in state["step_seconds"]]
        result.masks = [[bool(x) for x in mask] for mask in state["masks"]]
        result.early_accuracy, result.early_dir = state["early_accuracy"], state["early_dir"]
        seconds = float(state["train_seconds"])
        if len(result.losses) != step or len(result.step_seconds) != step or (gates is not None and len(result.masks) != step):
            raise ValueError(f"progress lists do not have {step} entries")
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise UserError(f"{checkpoint.folder}: checkpoint does not fit this run ({type(error).__name__}: {error}); "
                        "use --force to start over") from None
    return step, seconds


def _kept(out: Path | None) -> str:
    newest = latest_checkpoint(out / CHECKPOINTS_DIR) if out is not None else None
    if newest is None:
        return "no checkpoint of this run is on disk"
    return f"the last good checkpoint is kept in {newest} (run again with --resume)"


def _out_of_memory(error: RuntimeError) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError ("can't allocate memory")."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def _diverged(what: str, config: TrainConfig, kept: Path | None) -> str:
    where = f"; the last good checkpoint is kept in {kept}" if kept is not None else ""
    return f"{what}; lower lr (now {config.lr}){where}"


def _save_early(classifier: nn.Module, gates: CopRA | None, data: FewShotData, config: TrainConfig, out: Path | None):
    """Evaluate (all adapters on) and save the checkpoint at T/4: the paper's Early CopRA."""
    acc = accuracy(classifier, data.eval_x, data.eval_y)
    folder = None
    if out is not None:
        meta = metadata(config, data, accuracy=acc, checkpoint="early", at_step=math.ceil(config.steps / 4))
        folder = str(save_peft_model(classifier.encoder, out / "early", meta))
    classifier.train()
    return acc, folder
