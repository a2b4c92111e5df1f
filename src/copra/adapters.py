"""Adapters on disk, in PEFT's own format: `adapter_config.json` + `adapter_model.safetensors`.

Whatever copra writes, `PeftModel.from_pretrained(base, folder)` loads unchanged. Folders are
written atomically (a temporary sibling folder, then a rename), so a crash never leaves a
half-written adapter where a finished one is expected. Weights are only ever read with safetensors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from copra.errors import UserError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "copra.json"


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for path in tmp.iterdir():  # fsync files so the rename never exposes empty ones
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_peft_model(peft_model, folder: str | Path, metadata: dict | None = None) -> Path:
    """`peft_model.save_pretrained` into `folder` atomically, with copra's metadata beside it."""
    with atomic_folder(folder) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        if metadata is not None:
            write_json(tmp / METADATA_FILE, metadata)
    return Path(folder)


def save_adapter(state: dict[str, torch.Tensor], config: dict, folder: str | Path, metadata: dict | None = None) -> Path:
    """Write an adapter state dict (PEFT keys) and its adapter_config dict as a PEFT folder."""
    check_finite(state, str(folder))
    with atomic_folder(folder) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        write_json(tmp / CONFIG_FILE, config)
        if metadata is not None:
            write_json(tmp / METADATA_FILE, metadata)
    return Path(folder)


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN/inf weights, naming the first bad key."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{where}: tensor {key!r} contains NaN or inf")


def load_adapter(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, adapter_config dict) of a PEFT LoRA adapter folder, validated.

    Only safetensors weights are read; a pickled `adapter_model.bin` is refused, never unpickled.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"adapter folder not found: {folder}")
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        if (folder / "adapter_model.bin").exists():
            raise UserError(f"{folder}: only safetensors weights are accepted, found adapter_model.bin (pickle)")
        raise UserError(f"{folder}: missing {WEIGHTS_FILE}")
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder}: missing {CONFIG_FILE}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA" or "r" not in config:
        raise UserError(f"{config_path}: not a PEFT LoRA adapter config (needs peft_type LORA and r)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{weights}: not a readable safetensors file ({error})") from None
    if not state:
        raise UserError(f"{weights}: holds no tensors")
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise UserError(f"{weights}: tensor {key!r} has dtype {tensor.dtype}, expected a float type")
    check_finite(state, str(weights))
    return state, config


def read_metadata(folder: str | Path) -> dict:
    """copra's training metadata stored beside an adapter ({} if none)."""
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: store such values as null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
