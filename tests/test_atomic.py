"""copra.utils.atomic: outputs get the permissions a plain open() gives, and a crash mid-write leaves the old file."""

import json
import os
import stat

import pytest
import torch

from copra.adapters.io import save_adapter
from copra.experiments.runner.common import write_outputs
from copra.utils.atomic import atomic_folder, write_bytes, write_json


class Killed(BaseException):
    """Stands for a SIGKILL at the hook: nothing after it runs in the writer but its cleanup."""


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_summaries_and_adapters_get_the_mode_of_a_plain_open(tmp_path, umask):
    summary = write_outputs(
        tmp_path / "exp", "demo", {"config": {}, "accuracy": [0.5]}, lambda s, p: None, lambda s: "# demo\n"
    )
    assert json.loads((tmp_path / "exp" / "demo.json").read_text())["accuracy"] == summary["accuracy"] == [0.5]
    assert mode(tmp_path / "exp" / "demo.json") == mode(tmp_path / "exp" / "demo.md") == 0o644  # mkstemp: 0600
    state = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(3, 2)}
    folder = save_adapter(state, {"peft_type": "LORA", "r": 2, "target_modules": ["m"]}, tmp_path / "adapter")
    assert mode(folder) == 0o755 and mode(folder / "adapter_config.json") == 0o644  # mkdtemp: 0700
    umask(0o077)  # the umask is respected, as open() respects it
    write_json(tmp_path / "private.json", {"a": 1})
    assert mode(tmp_path / "private.json") == 0o600


def test_a_replaced_file_keeps_its_permissions(tmp_path, umask):
    path = tmp_path / "result.json"
    write_json(path, {"v": 1})
    os.chmod(path, 0o640)
    write_json(path, {"v": 2})
    assert mode(path) == 0o640 and json.loads(path.read_text()) == {"v": 2}


def test_a_crash_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json(path, {"old": True})
    old = path.read_bytes()
    seen = []

    def crash(fd):  # the new bytes are in the temporary sibling, not yet renamed: the process dies here
        temporary = [p for p in tmp_path.iterdir() if p.name.startswith(".summary.json.tmp-")]
        seen.append((path.read_bytes(), [json.loads(p.read_text()) for p in temporary]))
        raise Killed

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(Killed):
        write_json(path, {"old": False})
    assert seen == [(old, [{"old": False}])]  # at the crash: the old file whole, the new one beside it
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_crash_inside_an_atomic_folder_leaves_the_old_folder(tmp_path):
    target = tmp_path / "run"
    with atomic_folder(target) as tmp:
        write_bytes(tmp / "a.bin", b"old")
    with pytest.raises(Killed), atomic_folder(target) as tmp:
        write_bytes(tmp / "a.bin", b"new")
        write_bytes(tmp / "b.bin", b"new")
        raise Killed
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and sorted(os.listdir(target)) == ["a.bin"]
    assert (target / "a.bin").read_bytes() == b"old"
