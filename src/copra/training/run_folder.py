"""A training run's output folder: what it holds, what marks it finished, what `--resume` continues from.

    <output_dir>/adapter/          the final adapter (PEFT folder + copra.json, `metadata`)
                 early/            the Early CopRA adapter at T/4 (save_early)
                 snapshots/step-N  the adapter every snapshot_every steps
                 checkpoints/      resumable training state (`copra.training.checkpoint`), deleted once finished
                 result.json       the RunResult, written last: the "finished" mark

`training` runs the loop; this module is everything that loop reads from or leaves on disk.
A run is resumed only with the config it was started with (up to `RESUME_IGNORED`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from copra.adapters.io import load_adapter, save_peft_model
from copra.core.config import TrainConfig
from copra.core.gates import CopRA
from copra.training.checkpoint import (
    CHECKPOINTS_DIR,
    STATE_FILE,
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    remove_checkpoints,
    remove_leftovers,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from copra.utils.atomic import write_json
from copra.utils.errors import UserError

RESULT_FILE = "result.json"
SNAPSHOTS_DIR = "snapshots"  # adapters saved every `snapshot_every` steps
LOGS_DIR = "logs"  # TrainConfig.report_to's tracker logs (copra.training.tracking)
# config fields that may differ between a checkpoint and the run resuming it (they change no number)
RESUME_IGNORED = ("progress", "output_dir", "checkpoint_every", "report_to")
# Fields added after runs were first recorded, with the value those older runs in effect used (when
# it is not the field's default): a run recorded before a field existed is the same run only then.
RECORDED_BEFORE = {"precision": "fp32"}
# Fields only a decoder LLM (backbone causal) reads: for any other backbone they change nothing a run
# computes, so they are not compared there (runs recorded while their defaults differed stay reusable)
CAUSAL_ONLY = ("answer_score", "list_choices")


@dataclass
class RunResult:
    """What one run produced (also written as `result.json`, its "finished" mark)."""

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
    converged: bool | None = (
        None  # the training loss plateaued (copra.analysis.stats.plateau); None: too short to tell
    )
    plateau: dict | None = None  # the plateau test's statistic: window, improvement, last_mean, threshold
    precision: str | None = None  # the precision the run used ("fp32", "bf16", "fp16"; config "auto" resolved)
    state: dict | None = field(default=None, repr=False)  # the trained adapter (PEFT keys), in memory only

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "state"}


def metadata(config: TrainConfig, data, **results) -> dict:
    """The small JSON stored beside every adapter (`copra.json`).

    An embedded base whose weights are not the hub's (SmolLM2 dequantised from a GGUF) adds `base_model`:
    its hub id and how its weights differ, so an adapter is not taken for one trained on the hub's weights.
    """
    from copra.models.base_model import EMBEDDED

    schedule = None
    if config.method == "copra":
        schedule = {k: v for k, v in vars(config.gate_schedule()).items() if k != "total_steps"}
        schedule["granularity"] = config.granularity
    embedded = EMBEDDED.get(config.model)
    if embedded is not None and embedded.weights:
        results = {"base_model": {"hub_id": embedded.hub_id, "weights": embedded.weights}, **results}
    return {
        "method": config.method,
        "task": data.task,
        "seed": config.seed,
        "steps": config.steps,
        "shots": config.shots,
        "schedule": schedule,
        "classes": list(data.class_names),
        "config": config.to_dict(),
        **results,
    }


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
        kind = (
            "a finished run"
            if (out / RESULT_FILE).exists()
            else ("an unfinished run" if latest_checkpoint(out / CHECKPOINTS_DIR) else "files")
        )
        raise UserError(
            f"output_dir {out} already holds {kind}; pass --resume to continue or reuse it, or --force to start over"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file, not a folder")


def same_run(stored: dict, config: TrainConfig, where: Path) -> None:
    """UserError naming the first field where a stored run config differs from `config`.

    A field the stored config lacks reads as what runs before that field used (`RECORDED_BEFORE`,
    else the field's default), so finished runs stay reusable when TrainConfig gains a field."""
    if not isinstance(stored, dict):
        raise UserError(f"{where}: holds no run config")
    mine = config.to_dict()
    before = TrainConfig.defaults() | RECORDED_BEFORE
    causal = "causal" in (config.backbone, stored.get("backbone"))
    for key in sorted(set(stored) | set(mine)):
        if key in RESUME_IGNORED or (key in CAUSAL_ONLY and not causal):
            continue
        theirs = stored.get(key, before.get(key, "<unset>"))
        if key not in mine or theirs != mine[key]:
            raise UserError(
                f"{where} belongs to a run with {key}={theirs!r}, but this run has "
                f"{key}={mine.get(key, '<unset>')!r}; resume with the same config or use --force to start over"
            )


def resume_point(out: Path, config: TrainConfig) -> RunResult | Checkpoint | None:
    """What `--resume` continues from: the finished run, the newest checkpoint, or None (start at step 0)."""
    remove_leftovers(out)
    remove_leftovers(out / CHECKPOINTS_DIR)
    result_file = out / RESULT_FILE
    if result_file.is_file() and (out / "adapter").is_dir():
        return _finished_run(out, config)
    folder = latest_checkpoint(out / CHECKPOINTS_DIR)
    if folder is None:
        return None
    checkpoint = load_checkpoint(folder)
    same_run(checkpoint.state.get("config"), config, folder / STATE_FILE)
    if not 1 <= checkpoint.step < config.steps:
        raise UserError(f"{folder}: step {checkpoint.step} is outside 1..{config.steps - 1}")
    return checkpoint


def _finished_run(out: Path, config: TrainConfig) -> RunResult:
    """The RunResult (and trained adapter) of a finished run of `config` in `out`."""
    result_file = out / RESULT_FILE
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


def clear_run(out: Path) -> None:
    """Forget an earlier run in `out`: its checkpoints, snapshots, tracker logs and result.json no longer describe it."""
    remove_leftovers(out)
    shutil.rmtree(out / SNAPSHOTS_DIR, ignore_errors=True)
    shutil.rmtree(out / LOGS_DIR, ignore_errors=True)
    remove_checkpoints(out / CHECKPOINTS_DIR)
    (out / RESULT_FILE).unlink(missing_ok=True)


def save_snapshot(out: Path, encoder, config: TrainConfig, data, step: int) -> None:
    """The adapter as it is after `step` steps, all adapters on (learning curves, paper Fig. 6c)."""
    save_peft_model(encoder, snapshot_dir(out, step), metadata(config, data, checkpoint="snapshot", at_step=step))


def snapshot_dir(out: Path, step: int) -> Path:
    """The PEFT folder of the snapshot a run in `out` saved after `step` steps."""
    return Path(out) / SNAPSHOTS_DIR / f"step-{step}"


def snapshot_schedule(config: TrainConfig) -> range:
    """The steps after which a run of `config` saves a snapshot: every snapshot_every, before the end."""
    every = config.snapshot_every
    return range(every, config.steps, every) if every else range(0)


def snapshot_steps(out: Path) -> list[int]:
    """The steps at which the run in `out` saved snapshots, in order (none: [])."""
    return sorted(int(p.name.split("-")[1]) for p in (Path(out) / SNAPSHOTS_DIR).glob("step-*"))


def save_finished(out: Path, encoder, meta: dict, result: RunResult) -> None:
    """The final adapter, then `result.json` (the finished mark), then the checkpoints go."""
    result.adapter_dir = str(save_peft_model(encoder, out / "adapter", meta))
    write_json(out / RESULT_FILE, result.to_dict())
    remove_checkpoints(out / CHECKPOINTS_DIR)
    remove_leftovers(out)


def save_training_checkpoint(
    out: Path, step: int, named, optimizer, gates: CopRA | None, result: RunResult, seconds: float, scaler=None
) -> Path:
    """Parameters, AdamW and RNG states and progress after `step` steps, as `checkpoints/step-N`."""
    tensors = {f"param.{name}": p.detach() for name, p in named}
    if gates is not None:  # reseeded from (seed, step) at every step anyway; kept for inspection
        tensors["rng.gates"] = gates.state_dict()["generator"]
    optim_tensors, optim_json = optimizer_state(optimizer)
    rng_tensors, rng_json = rng_state()
    state = {
        "config": result.config,
        "optimizer": optim_json,
        "rng": rng_json,
        "train_seconds": seconds,
        "losses": result.losses,
        "step_seconds": result.step_seconds,
        "masks": result.masks,
        "early_accuracy": result.early_accuracy,
        "early_dir": result.early_dir,
        "precision": result.precision,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    return save_checkpoint(out / CHECKPOINTS_DIR, step, {**tensors, **optim_tensors, **rng_tensors}, state)


def restore(
    checkpoint: Checkpoint, named, optimizer, gates: CopRA | None, result: RunResult, scaler=None
) -> tuple[int, float]:
    """Parameters, optimizer, RNG states and progress from `checkpoint`; (first step, seconds so far)."""
    state, tensors, step = checkpoint.state, checkpoint.tensors, checkpoint.step
    try:
        _restore_parameters(named, tensors)
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
        if (
            len(result.losses) != step
            or len(result.step_seconds) != step
            or (gates is not None and len(result.masks) != step)
        ):
            raise ValueError(f"progress lists do not have {step} entries")
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        raise UserError(
            f"{checkpoint.folder}: checkpoint does not fit this run ({type(error).__name__}: {error}); "
            "use --force to start over"
        ) from None
    return step, seconds


def _restore_parameters(named, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in named:
            saved = tensors[f"param.{name}"]
            if saved.shape != param.shape or saved.dtype != param.dtype:
                raise ValueError(
                    f"parameter {name!r} is {tuple(saved.shape)} {saved.dtype} in the checkpoint, "
                    f"{tuple(param.shape)} {param.dtype} in the model"
                )
            param.copy_(saved)


def kept_note(out: Path | None) -> str:
    """Where the last good checkpoint is, for an error line."""
    newest = latest_checkpoint(out / CHECKPOINTS_DIR) if out is not None else None
    if newest is None:
        return "no checkpoint of this run is on disk"
    return f"the last good checkpoint is kept in {newest} (run again with --resume)"
