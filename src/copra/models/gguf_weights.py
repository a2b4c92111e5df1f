"""A GGUF file (llama.cpp's format) as a plain transformers folder: converted once, atomically, into copra's cache.

transformers reads a GGUF (`from_pretrained(folder, gguf_file=NAME)`, through the `gguf` package): the
config, the tokenizer (with its chat template) and the weights, dequantised to float32. It refuses to
`save_pretrained` such a model, so the folder is written from a model built from the same config (without
its `quantization_config`) and given the dequantised state dict; the folder then loads with
`AutoModelForCausalLM` / `AutoTokenizer` like any checkpoint, in about a second instead of ~30 s of
dequantising on every run. Safetensors only; `copra_source.json` beside the weights says where they came from.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

from copra.utils.errors import UserError

SOURCE_FILE = "copra_source.json"


def convert_gguf(gguf: Path, key: str, cache: Path, name: str, hub_id: str, weights: str | None = None) -> Path:
    """The causal LM in the GGUF file `gguf` as a safetensors folder `cache/name-key` (made once, atomically).

    `key` names the file's contents (its RECORD checksum), so another file gets its own folder; `hub_id` (the
    model's hub name) and `weights` (how they differ from the hub's) go to copra_source.json.
    A full disk or a read-only cache is one UserError line; nothing is left under the target's name.
    """
    target = cache / f"{name}-{key}"
    if (target / "config.json").exists():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading {gguf.name} needs the gguf package: pip install gguf")
    from copra.utils.atomic import atomic_folder, write_json

    tokenizer, model = _dequantised(gguf, hub_id)
    with atomic_folder(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / SOURCE_FILE, {"gguf": gguf.name, "key": key, "hub_id": hub_id, "weights": weights})
    return target


def _dequantised(gguf: Path, hub_id: str):
    """(tokenizer, float32 causal LM without quantization_config) of a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from copra.models.loading import quiet_loading

    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, IndexError, struct.error) as error:  # a truncated or foreign file
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot read the GGUF file {gguf}: {detail}") from None
    values = loaded.config.to_dict()
    values.pop("quantization_config", None)  # the weights are dequantised: the folder is a plain checkpoint
    values["_model_name_or_path"] = hub_id  # the GGUF's general.name is a training-run label
    config = type(loaded.config).from_dict(values)
    with quiet_loading():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return tokenizer, model.eval()


__all__ = ["SOURCE_FILE", "convert_gguf"]
