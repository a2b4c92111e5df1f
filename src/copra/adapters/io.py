"""Adapters on disk, in PEFT's own format: `adapter_config.json` + `adapter_model.safetensors`.

Whatever copra writes, `PeftModel.from_pretrained(base, folder)` loads unchanged. Folders are
written atomically (`copra.utils.atomic`: a temporary sibling folder, then a rename), so a crash never
leaves a half-written adapter where a finished one is expected. Weights are only ever read with
safetensors, and every folder read is validated first (one UserError line naming what is wrong).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from copra.utils.atomic import atomic_folder, fsync_dir, write_json
from copra.utils.errors import UserError

__all__ = [
    "CONFIG_FILE",
    "METADATA_FILE",
    "WEIGHTS_FILE",
    "atomic_folder",
    "check_finite",
    "check_lora_state",
    "finite_or_none",
    "fsync_dir",
    "load_adapter",
    "read_metadata",
    "read_safetensors",
    "save_adapter",
    "save_peft_model",
    "write_json",
]  # atomic_folder, fsync_dir, write_json: copra.utils.atomic's, kept here

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "copra.json"


def save_peft_model(peft_model, folder: str | Path, metadata: dict | None = None) -> Path:
    """`peft_model.save_pretrained` into `folder` atomically, with copra's metadata beside it.

    save_embedding_layers=False: copra never resizes the base's embeddings, and PEFT's "auto" would ask
    the hub about `base_model_name_or_path` (a hub id now, see `models.base_model.hub_name`) on every save.
    """
    with atomic_folder(folder) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        if metadata is not None:
            write_json(tmp / METADATA_FILE, metadata)
    return Path(folder)


def save_adapter(
    state: dict[str, torch.Tensor], config: dict, folder: str | Path, metadata: dict | None = None
) -> Path:
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


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<side>[AB])(?:\.weight)?$")
_PEFT_PREFIX = re.compile(r"^base_model\.model\.")


def load_adapter(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, adapter_config dict) of a PEFT LoRA adapter folder, validated.

    Only safetensors weights are read; a pickled `adapter_model.bin` is refused, never unpickled.
    Checked: both files present and parseable, a LoRA config with a positive integer rank, float
    tensors of one dtype, every lora_A with its lora_B and matching ranks (= `r` unless a
    rank_pattern is set), every LoRA module among the config's target_modules, no NaN or inf.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"adapter folder not found: {folder}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / "adapter_model.bin").exists():
            raise UserError(f"{folder}: only safetensors weights are accepted, found adapter_model.bin (pickle)")
        raise UserError(f"{folder}: missing {WEIGHTS_FILE}")
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder}: missing {CONFIG_FILE}") from None
    except (ValueError, UnicodeDecodeError, OSError, RecursionError) as error:
        raise UserError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA" or "r" not in config:
        raise UserError(f"{config_path}: not a PEFT LoRA adapter config (needs peft_type LORA and r)")
    rank = config["r"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"{config_path}: r must be a positive integer, got {rank!r}")
    state = read_safetensors(weights)
    if not state:
        raise UserError(f"{weights}: holds no tensors")
    check_lora_state(state, config, str(weights))
    return state, config


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; UserError naming the file if it is not one (a pickle, torn, ...)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error})") from None


def check_lora_state(state: dict[str, torch.Tensor], config: dict, where: str) -> None:
    """UserError naming the first tensor of `state` that does not make a valid LoRA adapter under `config`."""
    dtypes: dict[torch.dtype, str] = {}  # dtype -> the first key that has it
    for key, tensor in state.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise UserError(
                f"{where}: tensor {key!r} has dtype {tensor.dtype}, expected a float type "
                f"({', '.join(str(d).replace('torch.', '') for d in FLOAT_DTYPES)})"
            )
        dtypes.setdefault(tensor.dtype, key)
    if len(dtypes) > 1:
        (d1, k1), (d2, k2) = list(dtypes.items())[:2]
        raise UserError(f"{where}: mixed dtypes, tensor {k1!r} is {d1} but {k2!r} is {d2}")
    check_finite(state, where)
    sides: dict[str, dict[str, str]] = {}
    for key in state:
        match = _LORA_KEY.match(key)
        if match:
            sides.setdefault(match["module"], {})[match["side"]] = key
    if not sides:
        raise UserError(f"{where}: no LoRA tensors (no key contains lora_A / lora_B)")
    targets = config.get("target_modules")
    fixed_rank = None if config.get("rank_pattern") else config.get("r")
    for module, pair in sides.items():
        if set(pair) != {"A", "B"}:
            have, lacks = ("A", "B") if "A" in pair else ("B", "A")
            raise UserError(f"{where}: {pair[have]!r} has no matching lora_{lacks} tensor")
        a, b = state[pair["A"]], state[pair["B"]]
        if a.dim() < 2 or b.dim() < 2:
            raise UserError(
                f"{where}: {pair['A' if a.dim() < 2 else 'B']!r} has shape "
                f"{tuple((a if a.dim() < 2 else b).shape)}, expected a matrix"
            )
        embedding = ".lora_embedding_" in pair["A"]
        rank_a, rank_b = (a.shape[0], b.shape[1])
        if rank_a != rank_b or rank_a < 1:
            raise UserError(f"{where}: module {module!r} has rank {rank_a} in lora_A but {rank_b} in lora_B")
        if fixed_rank is not None and rank_a != fixed_rank and not embedding:
            raise UserError(
                f"{where}: module {module!r} has rank {rank_a}, but adapter_config.json says r={fixed_rank}"
            )
        if not _targeted(_PEFT_PREFIX.sub("", module), targets):
            raise UserError(
                f"{where}: module {module!r} is not among target_modules {targets!r} of adapter_config.json"
            )


def _targeted(module: str, targets) -> bool:
    """PEFT's rule: a list matches a module name or its dotted suffix, a string is a full regex match."""
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, module) is not None
        except re.error:
            return False
    if isinstance(targets, (list, tuple)):
        return any(isinstance(t, str) and (module == t or module.endswith("." + t)) for t in targets)
    return False


def read_metadata(folder: str | Path) -> dict:
    """copra's training metadata stored beside an adapter ({} if none)."""
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: store such values as null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
