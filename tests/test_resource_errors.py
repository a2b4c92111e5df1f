"""Resource errors are user errors: a full disk, no permission, a read-only or deleted folder, out of memory.

Each ends with one `copra: error:` line naming the path and the cause, the last good checkpoint kept
and nothing partial left. Faults are injected deterministically by monkeypatching (ENOSPC after N
bytes of a checkpoint, EROFS/EACCES on mkdir/open: the tests run as root, which chmod does not stop);
one slow test uses a real 256 KiB tmpfs and a read-only bind mount in a private mount namespace.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from copra.cli import main
from copra.utils import locks
from copra.utils.locks import lock_path

from conftest import files_under, train_sets

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _full_disk_after(nbytes: int, fail_at_call: int, kind: str = "oserror"):
    """A stand-in for safetensors' save_file: call `fail_at_call` writes `nbytes` bytes, then the disk is full."""
    import errno

    from safetensors import SafetensorError
    from safetensors.torch import save, save_file

    calls = []

    def writer(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) != fail_at_call:
            return save_file(tensors, path, *args, **kwargs)
        with open(path, "wb") as handle:
            handle.write(save(tensors)[:nbytes])
        if kind == "safetensors":  # what safetensors 0.8 raises on a real full tmpfs
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    return writer


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_disk_full_mid_checkpoint_is_one_line_and_keeps_the_previous_checkpoint(
    tiny_text_model, tmp_path, capsys, monkeypatch, kind
):
    from copra.training import checkpoint
    from copra.training.checkpoint import load_checkpoint

    out = tmp_path / "run"
    sets = train_sets(tiny_text_model, out, steps=6, checkpoint_every=2)
    monkeypatch.setattr(checkpoint, "save_file", _full_disk_after(1000, fail_at_call=2, kind=kind))
    code, stdout, err = _cli(capsys, "train", *sets)
    with capsys.disabled():  # the message as printed, for the record (-s)
        print("\n" + err, end="")
    assert code == 2 and err.count("\n") == 1 and not stdout
    assert err.startswith(
        f"copra: error: cannot write {out / 'checkpoints' / 'step-00000004'}: No space left on device "
        "(ENOSPC); free some space; the last good checkpoint is kept in "
    )
    assert err.rstrip().endswith(f"{out / 'checkpoints' / 'step-00000002'} (run again with --resume)")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]  # no partial write left
    assert load_checkpoint(out / "checkpoints" / "step-00000002").step == 2
    assert not (out / "adapter").exists() and not (out / "result.json").exists()
    monkeypatch.undo()
    code, _, err = _cli(capsys, "train", "--resume", *sets)
    assert code == 0 and "resumed from the checkpoint at step 2" in err


def _read_only(monkeypatch, folder: Path):
    """Every mkdir / os.open inside `folder` fails with EROFS (root ignores chmod, so chmod cannot test this)."""
    import errno

    real_open, real_mkdir = os.open, os.mkdir
    inside = str(folder.resolve()) + os.sep

    def refuse(real):
        def call(path, *args, **kwargs):
            if str(Path(os.fsdecode(path)).resolve()).startswith(inside):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "open", refuse(real_open))
    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))


def test_read_only_output_folder_is_one_line(tiny_text_model, tmp_path, capsys, monkeypatch):
    from copra.training.loop import train

    from conftest import tiny_run_config

    adapter = train(tiny_run_config(tiny_text_model), output_dir=tmp_path / "a").adapter_dir
    readonly = tmp_path / "ro"  # the output folder itself is read-only (its parent is not)
    readonly.mkdir()
    _read_only(monkeypatch, readonly)
    code, _, err = _cli(capsys, "train", "--resume", *train_sets(tiny_text_model, readonly, checkpoint_every=2))
    assert code == 2 and err.count("\n") == 1
    assert f"copra: error: cannot create the folder {readonly / 'checkpoints'}: Read-only file system (EROFS)" in err
    code, _, err = _cli(capsys, "merge", adapter, adapter, "-o", str(readonly / "merged"))  # the lock file: 1st write
    assert code == 2 and err.count("\n") == 1
    assert f"cannot lock {readonly / 'merged'}: {readonly / '.merged.copra-lock'}: Read-only file system" in err
    assert files_under(readonly) == []


@pytest.mark.parametrize("code", ["EACCES", "EPERM", "EDQUOT", "EROFS", "ENOSPC"])
def test_atomic_writers_turn_resource_errors_into_one_line_and_leave_nothing(tmp_path, monkeypatch, code):
    import errno

    import torch

    from copra.adapters.io import save_adapter, write_json
    from copra.utils.errors import ResourceError

    number = getattr(errno, code)
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(real):  # creating the temporary file or folder fails; tmp_path itself exists
        def call(path, *args, **kwargs):
            if ".tmp-" in os.fsdecode(path):
                raise OSError(number, os.strerror(number))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "open", refuse(real_open))
    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    state = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(3, 2)}
    with pytest.raises(ResourceError, match=rf"^cannot write {tmp_path / 'adapter'}: .* \({code}\); "):
        save_adapter(state, {"peft_type": "LORA", "r": 2, "target_modules": ["m"]}, tmp_path / "adapter")
    with pytest.raises(ResourceError, match=rf"^cannot write {tmp_path / 'x.json'}: .* \({code}\); "):
        write_json(tmp_path / "x.json", {"a": 1})
    assert files_under(tmp_path) == []


def test_other_os_errors_keep_their_traceback_and_ctrl_c_releases_the_lock(tiny_text_model, tmp_path, monkeypatch):
    import errno

    from copra.utils.errors import resource_error

    from conftest import interrupted_run, tiny_run_config

    assert resource_error(OSError(errno.EBADF, "Bad file descriptor")) is None  # a bug, not the machine
    assert resource_error(ValueError("no os error here")) is None
    out = tmp_path / "run"
    interrupted_run(
        tiny_run_config(tiny_text_model, steps=6, checkpoint_every=2, output_dir=str(out)), out, 2, monkeypatch
    )
    assert not lock_path(out).exists() and not locks._held  # KeyboardInterrupt let go of the lock


def test_folder_deleted_under_a_running_job_stops_it_with_one_line(tiny_text_model, tmp_path, capsys, monkeypatch):
    import shutil

    from copra.training import loop as training

    out = tmp_path / "run"
    real = training._save_checkpoint

    def save_then_delete(out_, step, *args):
        folder = real(out_, step, *args)
        shutil.rmtree(out_)  # someone removes the run folder while the job runs
        return folder

    monkeypatch.setattr(training, "_save_checkpoint", save_then_delete)
    code, _, err = _cli(capsys, "train", *train_sets(tiny_text_model, out, steps=6, checkpoint_every=2))
    assert code == 2 and err.count("\n") == 1
    assert f"{out} was deleted or replaced while this process was writing to it" in err
    assert not out.exists()  # not silently re-created


def test_out_of_memory_in_training_is_one_line_with_the_batch_size(tiny_text_model, tmp_path, capsys, monkeypatch):
    import torch

    from copra.training import loop as training

    calls, real = [], training.F.cross_entropy

    def oom_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(training.F, "cross_entropy", oom_at_step_3)
    out = tmp_path / "run"
    code, _, err = _cli(capsys, "train", *train_sets(tiny_text_model, out, steps=6, checkpoint_every=1, method="lora"))
    assert code == 2 and err.count("\n") == 1
    assert "out of memory training lora on parl_party with batch_size 4" in err and "grad_accum" in err
    assert f"kept in {out / 'checkpoints' / 'step-00000002'}" in err


def _in_private_mounts(script: str) -> subprocess.CompletedProcess:
    """Run `script` with sh in a private mount namespace (its mounts vanish with it), or skip."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot mount in a private mount namespace here (needs root or CAP_SYS_ADMIN)")
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=ENV, timeout=300)


@pytest.mark.slow
def test_a_real_full_disk_and_a_real_read_only_folder_give_one_line(tiny_text_model, tmp_path):
    """A 256 KiB tmpfs and a read-only bind mount, each in a private mount namespace."""
    full, readonly = tmp_path / "full", tmp_path / "ro"
    full.mkdir(), readonly.mkdir()
    train = f"{sys.executable} -m copra.cli train"
    done = _in_private_mounts(
        f"mount -t tmpfs -o size=256k tmpfs {full} && mount --bind -o ro {readonly} {readonly} && "
        f"{train} {' '.join(train_sets(tiny_text_model, full / 'run', steps=4, rank=64, checkpoint_every=1))}; echo rc=$?; "
        f"{train} {' '.join(train_sets(tiny_text_model, readonly / 'run', steps=4))}; echo rc=$?"
    )
    lines = done.stderr.strip().splitlines()
    print("\n" + "\n".join(lines[-2:]))
    assert done.stdout.split() == ["rc=2", "rc=2"]
    assert "No space left on device (ENOSPC)" in lines[-2] and str(full / "run") in lines[-2]
    assert (
        lines[-1]
        == f"copra: error: output_dir {readonly / 'run'} cannot be written: read-only file system in {readonly}"
    )
