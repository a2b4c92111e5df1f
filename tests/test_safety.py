"""No unsafe deserialisation: pickles planted where weights or checkpoints are expected are refused unread.

The payload's __reduce__ creates a marker file when unpickled; the loaders must refuse it with a
UserError and the marker must never appear. A static check keeps pickle-capable loaders out of src/.
"""

import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from copra.adapters.io import load_adapter
from copra.cli import main
from copra.training.checkpoint import CHECKPOINTS_DIR, STATE_FILE, TENSORS_FILE, load_checkpoint
from copra.utils.errors import UserError

from conftest import interrupted_run, tiny_run_config

SRC = Path(__file__).resolve().parents[1] / "src" / "copra"


class Payload:
    """Unpickling this creates `marker` (stands in for arbitrary code execution)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payloads(marker: Path) -> dict[str, bytes]:
    raw = pickle.dumps(Payload(marker))
    buffer = io.BytesIO()
    torch.save({"state": Payload(marker)}, buffer)  # torch.save's zip format with the pickle inside
    return {"pickle": raw, "torch.save": buffer.getvalue()}


def test_the_payloads_are_live(tmp_path):
    """Guard against a vacuous test: unpickling either payload does create the marker."""
    for kind, payload in _payloads(tmp_path / "owned").items():
        if kind == "pickle":
            pickle.loads(payload)
        else:  # what an unguarded torch.load would do (never done in src/: see the static check below)
            with zipfile.ZipFile(io.BytesIO(payload)) as archive:
                assert any(name.endswith("data.pkl") for name in archive.namelist())
            torch.load(io.BytesIO(payload), weights_only=False)
        assert (tmp_path / "owned").exists(), kind
        (tmp_path / "owned").unlink()


def _adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    key = "base_model.model.encoder.layer.0.attention.self.query"
    save_file(
        {f"{key}.lora_A.weight": torch.ones(2, 4), f"{key}.lora_B.weight": torch.ones(4, 2)},
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["query"]}))
    return folder


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickled_adapter_weights_are_refused(tmp_path, capsys, kind):
    marker = tmp_path / "owned"
    payload = _payloads(marker)[kind]
    as_bin = _adapter(tmp_path / "bin")
    (as_bin / "adapter_model.safetensors").unlink()
    (as_bin / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(UserError, match="adapter_model.bin"):
        load_adapter(as_bin)
    disguised = _adapter(tmp_path / "disguised")
    (disguised / "adapter_model.safetensors").write_bytes(payload)
    with pytest.raises(UserError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(disguised)
    for argv in (
        ["prune", str(as_bin), "--sparsity", "0.5", "-o", str(tmp_path / "p")],
        ["merge", str(disguised), str(_adapter(tmp_path / "good")), "-o", str(tmp_path / "m")],
    ):
        assert main(argv) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "p").exists() and not (tmp_path / "m").exists()


def test_pickled_checkpoint_files_are_refused(tiny_text_model, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "owned"
    out = tmp_path / "run"
    config = tiny_run_config(tiny_text_model, steps=6, checkpoint_every=2, output_dir=str(out))
    interrupted_run(config, out, 2, monkeypatch)
    folder = out / CHECKPOINTS_DIR / "step-00000002"
    tensors = folder / TENSORS_FILE
    state = (folder / STATE_FILE).read_bytes()
    argv = [
        "train",
        "--resume",
        "--set",
        f"model={tiny_text_model}",
        "--set",
        f"output_dir={out}",
        "--set",
        "steps=6",
        "--set",
        "checkpoint_every=2",
        *[
            a
            for k, v in dict(
                task="bbc_news", shots=2, batch_size=4, eval_examples=20, max_length=16, progress="false"
            ).items()
            for a in ("--set", f"{k}={v}")
        ],
    ]
    cases = []
    for kind, payload in _payloads(marker).items():
        cases.append((f"{kind} as {TENSORS_FILE}", {TENSORS_FILE: payload}, None, "not a readable safetensors file"))
        cases.append((f"{kind} as optimizer.pt", {"optimizer.pt": payload}, TENSORS_FILE, "refusing optimizer.pt"))
        cases.append((f"{kind} as {STATE_FILE}", {STATE_FILE: payload}, None, "not a readable JSON checkpoint state"))
    original = tensors.read_bytes()
    for name, planted, removed, message in cases:
        for file, payload in planted.items():
            (folder / file).write_bytes(payload)
        if removed:
            (folder / removed).unlink()
        with pytest.raises(UserError, match=re.escape(message)):
            load_checkpoint(folder)
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, name
        assert not marker.exists(), name
        # put the good checkpoint back for the next case
        for file in planted:
            (folder / file).unlink()
        tensors.write_bytes(original)
        (folder / STATE_FILE).write_bytes(state)
    assert main(argv) == 0 and (out / "adapter" / "adapter_model.safetensors").exists()  # the real one resumes
    assert not marker.exists()


def _python_sources() -> list[tuple[Path, str]]:
    return [(path, path.read_text(encoding="utf-8")) for path in sorted(SRC.rglob("*.py"))]


def test_no_pickle_capable_loader_in_the_sources():
    """torch.load only with weights_only=True, no pickle / unsafe yaml / pickled numpy anywhere in src/."""
    assert len(_python_sources()) > 20
    problems = []
    for path, text in _python_sources():
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                problems.append(f"{path.name}: {match.group(0)}")
        for pattern in (
            r"\bimport pickle\b",
            r"\bpickle\.loads?\(",
            r"\bdill\b",
            r"\bcloudpickle\b",
            r"yaml\.load\(",
            r"yaml\.unsafe_load",
            r"Loader=yaml\.(Full|Unsafe)?Loader",
            r"allow_pickle=True",
            r"torch\.save\(",
            r"use_safetensors=False",
        ):
            problems += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not problems, problems
    # the loaders that do exist say so explicitly
    text = {p.name: t for p, t in _python_sources()}
    assert "use_safetensors=True" in text["text.py"] and "use_safetensors=True" in text["clip.py"]
    assert "yaml.safe_load" in text["settings.py"]  # the one YAML loader (TrainConfig and every experiment config)


def test_model_folders_with_only_pickled_weights_are_refused(tmp_path, tiny_text_model, capsys):
    """A backbone folder with pytorch_model.bin (pickle) instead of model.safetensors is not loaded."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_text_model, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "owned"
    (folder / "pytorch_model.bin").write_bytes(_payloads(marker)["torch.save"])
    code = main(
        [
            "train",
            "--set",
            f"model={folder}",
            "--set",
            f"output_dir={tmp_path / 'out'}",
            "--set",
            "progress=false",
            "--set",
            "shots=2",
            "--set",
            "max_length=16",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "cannot load the text encoder" in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "out").exists()
