"""Training checkpoints for exact resume: tensors in safetensors, everything else in JSON, never pickle.

    <output_dir>/checkpoints/step-00000012/
        tensors.safetensors   trainable parameters ("param.<name>"), AdamW state ("optim.<i>.<key>"),
                              torch RNG states ("rng.torch", "rng.cuda.<i>", "rng.gates")
        state.json            format, step, run config, optimizer param_groups, python and numpy RNG
                              states, progress (losses, step times, masks, early checkpoint)

Crash safety. A checkpoint folder is written by `atomic.atomic_folder` under a new name (temporary
sibling, files fsynced, one rename), so a folder named `step-N` is always complete; only after that
rename are older checkpoints renamed away and deleted. A process killed at any point leaves either the
previous checkpoint or the new one (plus hidden leftovers, which `remove_leftovers` clears), never a
half-written one under a checkpoint name. No `torch.save` / `torch.load` anywhere: the loader reads
exactly these two files, through safetensors and json, and refuses a folder holding pickles instead.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from copra.adapters.io import check_finite, read_safetensors
from copra.utils.atomic import atomic_folder, fsync_dir
from copra.utils.errors import UserError

FORMAT = "copra-checkpoint-1"
CHECKPOINTS_DIR = "checkpoints"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
_NAME = re.compile(r"^step-(\d{8,})$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# hidden siblings that atomic writes leave behind when a process is killed mid-write
_LEFTOVER = re.compile(r"^\..+\.(tmp|old|trash)-[^/]*$")


@dataclass
class Checkpoint:
    """One loaded checkpoint: its folder, tensors (by name) and JSON state."""

    folder: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write checkpoint `step` under `root` atomically, then delete the older ones; returns its folder."""
    root = Path(root)
    body = json.dumps({"format": FORMAT, "step": step, **state}, indent=1, allow_nan=False)  # fails before writing
    folder = root / checkpoint_name(step)
    with atomic_folder(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
        (tmp / STATE_FILE).write_text(body + "\n", encoding="utf-8")
    for older in _steps(root):
        if older[0] != step:
            _discard(older[1])
    return folder


def _steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint under `root`, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _discard(folder: Path) -> None:
    """Delete a folder so that a kill midway never leaves a partial folder under its real name."""
    trash = folder.with_name(f".{folder.name}.trash-{os.getpid()}")
    try:
        os.replace(folder, trash)
    except FileNotFoundError:
        return
    fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint folder under `root`, or None."""
    steps = _steps(Path(root))
    return steps[0][1] if steps else None


def remove_checkpoints(root: str | Path) -> None:
    """Delete every checkpoint of a run (after its final adapter is written)."""
    root = Path(root)
    if root.exists():
        _discard(root)


def remove_leftovers(folder: str | Path) -> None:
    """Delete the hidden temporary folders/files a killed atomic write leaves in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if _LEFTOVER.match(path.name):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Read and check one checkpoint folder; UserError naming the file for anything wrong or unsafe."""
    folder = Path(folder)
    tensors_path, state_path = folder / TENSORS_FILE, folder / STATE_FILE
    if not tensors_path.is_file() or not state_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickles:
            raise UserError(
                f"{folder}: only safetensors and JSON checkpoints are read; refusing {pickles[0]} "
                "(pickle files are never loaded)"
            )
        missing = TENSORS_FILE if not tensors_path.is_file() else STATE_FILE
        raise UserError(f"{folder}: incomplete checkpoint, missing {missing}")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as error:
        raise UserError(f"{state_path}: not a readable JSON checkpoint state ({error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{state_path}: not a copra checkpoint (format {FORMAT!r} expected)")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise UserError(f"{state_path}: step must be a positive integer, got {step!r}")
    tensors = read_safetensors(tensors_path)
    check_finite(tensors, str(tensors_path))
    return Checkpoint(folder, tensors, state)


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) of the python, numpy and torch global RNG states."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda])
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            np.asarray(numpy["keys"], dtype=np.uint32),
            int(numpy["pos"]),
            int(numpy["has_gauss"]),
            float(numpy["cached_gaussian"]),
        )
    )


# ----------------------------------------------------------------------------- optimizer state


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors "optim.<param index>.<key>", JSON param_groups) of a torch optimizer, without pickle."""
    full = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, values in full["state"].items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {key!r} is not a tensor; cannot checkpoint it without pickle")
            tensors[f"optim.{index}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()} for group in full["param_groups"]]
    return tensors, {"param_groups": groups}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Put what `optimizer_state` returned back into an optimizer over the same parameters."""
    groups = []
    for group, mine in zip(state["param_groups"], optimizer.param_groups, strict=True):
        if len(group["params"]) != len(mine["params"]):
            raise ValueError(
                f"a parameter group has {len(group['params'])} parameters, the model {len(mine['params'])}"
            )
        groups.append({k: tuple(v) if k == "betas" else v for k, v in group.items()})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            i = int(index)
            if not 0 <= i < len(params) or (key != "step" and value.shape != params[i].shape):
                raise ValueError(f"optimizer tensor {name!r} does not fit the model's parameters")
            per_param.setdefault(i, {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
