"""A small, plain training loop: LoRA or CopRA with the same budget (AdamW, cosine, accumulation).

One optimizer step = `grad_accum` micro-batches of `batch_size` few-shot examples. For CopRA the
gates are drawn once per optimizer step (`CopRA.step`), so all micro-batches of a step share them.
Everything is seeded by `config.seed`: few-shot sample, LoRA init, LoRA dropout, batch order, gates.

Crash safety: with an output folder, `train` checkpoints every `checkpoint_every` steps (parameters,
AdamW state, RNG states and progress; `copra.training.checkpoint`) and `train(..., resume=True)` continues a
killed run to the very adapter an uninterrupted run gives. The batch order is replayed to the
checkpoint's step and the gates depend only on (seed, step), so neither needs saved state.
A NaN/inf loss or weight stops the run (TrainingDiverged) before anything bad is written.
What the loop reads from and leaves in its output folder is `copra.training.run_folder` (re-exported here).
`config.report_to` logs every step to TensorBoard or MLflow through Accelerate (`copra.training.tracking`).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from copra.adapters.io import save_peft_model
from copra.analysis.stats import plateau
from copra.core.config import TrainConfig
from copra.core.gates import CopRA
from copra.core.schedule import learning_rate
from copra.models.evaluation import FewShotData, accuracy, adapter_state, load_adapter_state, prepare_data
from copra.training.run_folder import (
    RunResult,
    check_writable,
    clear_run,
    kept_note,
    metadata,
    restore,
    resume_point,
    save_finished,
    save_snapshot,
    snapshot_schedule,
)
from copra.training.run_folder import (
    save_training_checkpoint as _save_checkpoint,  # a test hook: looked up at call time
)
from copra.training.tracking import accelerator_options, check_tracker, end_tracking, log_step, start_tracking
from copra.utils.errors import ResourceError, UserError
from copra.utils.locks import folder_lock
from copra.utils.precision import grad_scaler
from copra.utils.precision import resolve as resolve_precision


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


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


def lr_at(step: int, config: TrainConfig) -> float:
    """The run's lr at `step`: the paper's cosine, or `config.lr_schedule` (see `copra.core.schedule`)."""
    return learning_rate(step, config.steps, config.lr, config.min_lr, config.lr_schedule, config.ramp_fraction)


def build_run(config: TrainConfig, data: FewShotData | None = None):
    """(classifier with fresh, seeded LoRA, data) for a run, without training."""
    from copra.models import build_classifier

    data = data or prepare_data(config)
    seed_everything(config.seed)
    classifier = build_classifier(config)
    classifier.set_prompts(list(data.prompts))
    return classifier, data


def train(
    config: TrainConfig,
    data: FewShotData | None = None,
    output_dir: str | Path | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
    resume: bool = False,
) -> RunResult:
    """Train one adapter and evaluate it; write it (and the early one) if `output_dir` is given.

    `initial_state` (PEFT keys) replaces the fresh LoRA init, e.g. a federated round's merged adapter.
    The trained adapter comes back in `RunResult.state`.

    With `output_dir`, a checkpoint is written every `config.checkpoint_every` steps (atomically, see
    `copra.training.checkpoint`) and deleted once the final adapter and `result.json` are written.
    `resume=True` continues from the newest checkpoint there (its config must equal `config` up to
    `RESUME_IGNORED`), so the final adapter is bit-identical to an uninterrupted run; with no
    checkpoint it starts at step 0, and a finished run (`result.json`) is returned as it is.

    The run holds `output_dir`'s lock (`copra.utils.locks`) throughout: FolderInUse if another process has
    it. A full disk, a permission / read-only error, a deleted folder or running out of memory is one
    UserError line that names the path or the batch size and where the last good checkpoint is.
    """
    out = Path(output_dir) if output_dir is not None else None
    precision = resolve_precision(config.precision)  # fp16 on a CPU: one error line before anything is written
    if resume and out is None:
        raise UserError("resuming needs the output folder that holds the checkpoint")
    check_tracker(config.report_to, out)  # a missing tracker package is one line before anything is written
    if out is not None:
        check_writable(out)
    with folder_lock(out) if out is not None else nullcontext():  # one owner per run folder (re-entrant)
        try:
            return _train(config, data, out, initial_state, resume, precision)
        except ResourceError as error:
            if out is None:
                raise
            raise ResourceError(f"{error}; {kept_note(out)}") from None
        except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
            if not isinstance(error, MemoryError) and not _out_of_memory(error):
                raise
            raise UserError(
                f"out of memory training {config.method} on {config.task} with batch_size "
                f"{config.batch_size} (max_length {config.max_length}): lower batch_size and raise "
                f"grad_accum to keep the effective batch; {kept_note(out)}"
            ) from None


def _train(
    config: TrainConfig,
    data: FewShotData | None,
    out: Path | None,
    initial_state: dict[str, torch.Tensor] | None,
    resume: bool,
    precision: str,
) -> RunResult:
    checkpoint = None
    if resume:
        point = resume_point(out, config)
        if isinstance(point, RunResult):
            return point
        checkpoint = point
        if checkpoint is not None and checkpoint.state.get("precision", precision) != precision:
            raise UserError(
                f"{checkpoint.folder} was trained in {checkpoint.state['precision']}, but this machine runs "
                f"precision={config.precision} as {precision}; set precision to match or use --force"
            )
    loop = _Loop(config, data, out, initial_state, precision)
    try:
        loop.start(checkpoint)
        for step in loop.bar:
            step_start = time.perf_counter()
            loss_value = loop.step(step)
            loop.result.step_seconds.append(time.perf_counter() - step_start)
            loop.result.losses.append(loss_value)
            loop.bar.set_postfix(loss=f"{loss_value:.3f}")
            loop.log(step, loss_value)
            loop.after_step(step + 1)
        return loop.finish()
    finally:
        end_tracking(loop.accelerator)  # a diverged or killed run's logs are flushed too


class _Loop:
    """One run's model, optimizer and progress; `train` drives it a step at a time."""

    def __init__(
        self,
        config: TrainConfig,
        data: FewShotData | None,
        out: Path | None,
        initial_state: dict[str, torch.Tensor] | None,
        precision: str,
    ):
        self.config = config
        self.classifier, self.data = build_run(config, data)
        if initial_state is not None:
            load_adapter_state(self.classifier, initial_state)
        self.gates = (
            CopRA(self.classifier.encoder, config.gate_schedule(), granularity=config.granularity, seed=config.seed)
            if config.method == "copra"
            else None
        )
        if self.gates is not None and config.prefix_cache and hasattr(self.classifier, "enable_prefix_cache"):
            self.classifier.enable_prefix_cache(self.gates)
        self.named = [(n, p) for n, p in self.classifier.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.accelerator = make_accelerator(**accelerator_options(config.report_to, out))
        # `model` is DDP-wrapped under `accelerate launch`
        self.model, self.optimizer = self.accelerator.prepare(self.classifier, optimizer)
        self.out = out if self.accelerator.is_main_process else None  # one process writes adapters and checkpoints
        self.labels = torch.tensor(self.data.train_y)
        self.order = batches(len(self.data.train_x), config.batch_size, config.seed)
        self.early_step = math.ceil(config.steps / 4) if config.save_early else None
        self.result = RunResult(
            config=config.to_dict(),
            accuracy=float("nan"),
            seconds_per_step=0.0,
            train_seconds=0.0,
            precision=precision,
        )
        self.scaler = grad_scaler(precision, self.accelerator.device.type)  # fp16 only
        self.previous_seconds, self.last_checkpoint = 0.0, None

    def start(self, checkpoint) -> None:
        """Continue from `checkpoint` (replaying the batch order to its step), or start a fresh folder."""
        first_step = 0
        if checkpoint is not None:
            first_step, self.previous_seconds = restore(
                checkpoint, self.named, self.optimizer, self.gates, self.result, self.scaler
            )
            self.last_checkpoint = checkpoint.folder
            for _ in range(first_step * self.config.grad_accum):  # the batch order continues where it stopped
                next(self.order)
        elif self.out is not None:
            clear_run(self.out)  # an earlier run's checkpoints and result.json no longer describe this folder
        start_tracking(self.accelerator, self.config)  # after clear_run, which removes an earlier run's logs
        self.result.resumed_from = first_step if checkpoint is not None else None
        self.classifier.train()
        config = self.config
        self.bar = tqdm(
            range(first_step, config.steps),
            desc=f"{config.method} {self.data.task} seed {config.seed}",
            disable=not config.progress,
            leave=False,
            initial=first_step,
            total=config.steps,
        )
        self.start_time = time.perf_counter()

    def step(self, step: int) -> float:
        """One optimizer step (lr, gates, `grad_accum` micro-batches, the update); its training loss."""
        config, accelerator, device = self.config, self.accelerator, self.accelerator.device
        rank, world = accelerator.process_index, accelerator.num_processes
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        if self.gates is not None:
            self.result.masks.append(self.gates.step(step))
        loss_value = 0.0
        for _ in range(config.grad_accum):
            idx = next(self.order)[rank::world]  # data parallel: each process takes its share of the batch
            inputs = self.classifier.inputs_for([self.data.train_x[i] for i in idx], train=True)
            logits = self.model(**{k: v.to(device) for k, v in inputs.items()})  # [B, C]
            loss = F.cross_entropy(logits, self.labels[idx].to(device)) / config.grad_accum  # fp32 logits and loss
            accelerator.backward(self.scaler.scale(loss) if self.scaler is not None else loss)
            # every process sees the same loss, so all of them stop together on NaN
            loss_value += (accelerator.reduce(loss.detach(), "mean") if world > 1 else loss.detach()).item()
        if not math.isfinite(loss_value):
            raise self._diverged(f"loss became {loss_value} at step {step}")
        self._update(step)
        return loss_value

    def log(self, step: int, loss_value: float) -> None:
        """Step `step`'s loss, lr, p(t) and active-gate fraction to the trackers, if `report_to` names one."""
        mask = self.result.masks[-1] if self.gates is not None else None
        p = self.gates.probability(step) if self.gates is not None else 1.0
        active = sum(mask) / len(mask) if mask else 1.0
        log_step(self.accelerator, step, loss_value, lr_at(step, self.config), p, active)

    def _update(self, step: int) -> None:
        try:
            if self.scaler is not None:  # skips the step when fp16 gradients overflowed, then adapts the scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        except RuntimeError as error:  # e.g. lr / (1 - beta1) beyond float range
            if "overflow" not in str(error):
                raise
            raise self._diverged(f"the optimizer step overflowed at step {step}") from None
        self.optimizer.zero_grad(set_to_none=True)  # gated-off adapters keep grad None: AdamW skips them
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            raise self._diverged(f"adapter weights became NaN or inf at step {step}")

    def after_step(self, steps_done: int) -> None:
        """The early adapter, a snapshot and a checkpoint, when `steps_done` steps call for them."""
        config, out = self.config, self.out
        if self.early_step is not None and steps_done == self.early_step:
            self.result.early_accuracy, self.result.early_dir = self._save_early()
        if out is not None and steps_done in snapshot_schedule(config):
            save_snapshot(out, self.classifier.encoder, config, self.data, steps_done)
        if (
            out is not None
            and config.checkpoint_every
            and steps_done % config.checkpoint_every == 0
            and steps_done < config.steps
        ):
            seconds = self.previous_seconds + time.perf_counter() - self.start_time
            self.last_checkpoint = _save_checkpoint(
                out, steps_done, self.named, self.optimizer, self.gates, self.result, seconds, self.scaler
            )

    def finish(self) -> RunResult:
        """Timing, convergence, the all-on evaluation; the adapter and result.json when there is a folder."""
        result, config = self.result, self.config
        loss_value = result.losses[-1] if result.losses else float("nan")
        result.train_seconds = self.previous_seconds + time.perf_counter() - self.start_time
        result.seconds_per_step = float(
            np.mean(result.step_seconds)
        )  # optimizer steps only (no early-checkpoint eval)
        result.final_loss = loss_value
        result.plateau = plateau(result.losses).to_dict()
        result.converged = result.plateau["converged"]
        active = [sum(mask) / len(mask) for mask in result.masks]
        result.mean_active_fraction = float(np.mean(active)) if active else 1.0
        if self.gates is not None:
            self.gates.remove()
            self.classifier.prefix_cache = None
        result.accuracy = accuracy(self.classifier, self.data.eval_x, self.data.eval_y)
        result.state = adapter_state(self.classifier)
        if self.out is not None:
            meta = metadata(
                config,
                self.data,
                accuracy=result.accuracy,
                precision=result.precision,
                seconds_per_step=result.seconds_per_step,
                train_seconds=result.train_seconds,
                final_loss=loss_value,
                early_accuracy=result.early_accuracy,
            )
            save_finished(self.out, self.classifier.encoder, meta, result)
        return result

    def _save_early(self):
        """Evaluate (all adapters on) and save the checkpoint at T/4: the paper's Early CopRA."""
        acc = accuracy(self.classifier, self.data.eval_x, self.data.eval_y)
        folder = None
        if self.out is not None:
            meta = metadata(self.config, self.data, accuracy=acc, checkpoint="early", at_step=self.early_step)
            folder = str(save_peft_model(self.classifier.encoder, self.out / "early", meta))
        self.classifier.train()
        return acc, folder

    def _diverged(self, what: str) -> TrainingDiverged:
        where = (
            f"; the last good checkpoint is kept in {self.last_checkpoint}" if self.last_checkpoint is not None else ""
        )
        return TrainingDiverged(f"{what}; lower lr (now {self.config.lr}){where}")


def make_accelerator(**options):
    """Hugging Face Accelerate: a no-op wrapper in one process, data-parallel DDP under `accelerate launch`.

    Gated-off adapters get no gradient in a step, so DDP must not wait for them
    (find_unused_parameters); every process draws the same gates, seeded by (seed, step).
    `options` go to `Accelerator` (the trackers of `tracking.accelerator_options`).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)], **options)


def _out_of_memory(error: RuntimeError) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError ("can't allocate memory")."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)
