"""One owner per output folder (`copra.utils.locks`): a second process is refused at once, naming the holder.

The lock is a flock on `<parent>/.<name>.copra-lock`. `_foreign_lock` takes it through a separate
open file description, which the kernel treats exactly like another process; the slow tests use real
processes (four concurrent `copra train`, a second `copra reproduce`, a SIGKILLed holder). Resource
errors are in test_resource_errors.py.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from copra.cli import main
from copra.report import suite
from copra.utils.locks import FolderInUse, folder_lock, holder, lock_path

from conftest import files_under, train_sets

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@contextmanager
def _foreign_lock(folder: Path, pid: int = 4242, host: str = "elsewhere"):
    """Hold `folder`'s lock through another open file description, as another process would."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": pid, "host": host, "started": "2026-11-29 10:00:00 UTC"}).encode())
    try:
        yield path
    finally:
        os.close(fd)


def test_lock_is_reentrant_names_its_holder_and_leaves_nothing(tmp_path):
    folder = tmp_path / "new" / "deeper" / "run"
    with folder_lock(folder):
        info = holder(folder)
        assert info["pid"] == os.getpid() and info["host"] and info["started"].endswith("UTC")
        with folder_lock(tmp_path / "new" / "deeper" / ".." / "deeper" / "run"):  # same folder, other spelling
            pass
        assert lock_path(folder).exists()  # still held by the outer block
        with _pytest_raises_in_use(folder):
            pass
    assert not (tmp_path / "new").exists()  # lock file and the parents made for it are gone


@contextmanager
def _pytest_raises_in_use(folder: Path):
    """A second open file description of a held lock cannot take it (what another process sees)."""
    fd = os.open(lock_path(folder), os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    lock_path(folder).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "long ago"}))
    with folder_lock(folder):
        assert holder(folder)["pid"] == os.getpid()
    assert not lock_path(folder).exists()


def test_every_writing_command_is_refused_while_another_process_holds_its_folder(tiny_text_model, tmp_path, capsys):
    """train, an experiment, sweep, reproduce, demo, merge, prune, report: exit 2, one line, nothing written."""
    from copra.training.loop import train

    from conftest import tiny_run_config

    adapter = Path(train(tiny_run_config(tiny_text_model), output_dir=tmp_path / "a").adapter_dir)
    model = ["--set", f"model={tiny_text_model}"]
    commands = {
        "train": (["train", *train_sets(tiny_text_model, tmp_path / "busy")], tmp_path / "busy"),
        "train --resume": (["train", "--resume", *train_sets(tiny_text_model, tmp_path / "busy")], tmp_path / "busy"),
        "pruning": (["pruning", "-o", str(tmp_path / "busy"), *model], tmp_path / "busy"),
        "sweep": (["sweep", "-o", str(tmp_path / "busy"), *model], tmp_path / "busy"),
        "reproduce": (["reproduce", "-o", str(tmp_path / "busy"), "-q", *model], tmp_path / "busy"),
        "demo": (["demo", "-o", str(tmp_path / "busy"), "-q"], tmp_path / "busy"),
        "merge": (["merge", str(adapter), str(adapter), "-o", str(tmp_path / "busy")], tmp_path / "busy"),
        "prune": (["prune", str(adapter), "--sparsity", "0.5", "-o", str(tmp_path / "busy")], tmp_path / "busy"),
        "report": (["report", str(tmp_path / "a"), "-o", str(tmp_path / "busy")], tmp_path / "busy"),
    }
    for name, (argv, folder) in commands.items():
        with _foreign_lock(folder):
            code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, (name, err)
        assert f"copra: error: {folder} is in use by another copra process (PID 4242 on elsewhere, started " in err, (
            name
        )
        assert not folder.exists(), (name, files_under(folder))  # nothing written


def test_a_locked_run_folder_inside_a_suite_is_refused_before_training(tiny_text_model, tmp_path):
    from copra.experiments.runner.runs import run_all

    from conftest import tiny_run_config

    plan = [(tiny_run_config(tiny_text_model, seed=s), tmp_path / "runs" / f"seed{s}") for s in (0, 1)]
    (tmp_path / "runs" / "seed1").mkdir(parents=True)
    with _foreign_lock(tmp_path / "runs" / "seed1"):
        with pytest.raises(FolderInUse, match="seed1 is in use .*PID 4242"):
            run_all(plan)


# ----------------------------------------------------------------------------- real processes


def _copra(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "copra.cli", *argv], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


@pytest.mark.slow
def test_four_concurrent_trains_into_one_folder_exactly_one_wins_and_its_adapter_stays(tiny_text_model, tmp_path):
    """Four `copra train` processes (four seeds) started together on one output folder."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    seeds = [11, 12, 13, 14]
    processes = [
        _copra("train", *train_sets(tiny_text_model, out, steps=30, seed=seed, method="copra")) for seed in seeds
    ]
    done = [_finish(p) for p in processes]
    winners = [i for i, (code, _, _) in enumerate(done) if code == 0]
    print("exit codes:", [code for code, _, _ in done], "refusals:", [err.strip() for code, _, err in done if code])
    assert len(winners) == 1
    for code, stdout, err in (d for i, d in enumerate(done) if i != winners[0]):
        assert code == 2 and not stdout and err.count("\n") == 1 and err.startswith("copra: error: ")
        assert "is in use by another copra process (PID " in err or "already holds a finished run" in err
    seed, (_, stdout, _) = seeds[winners[0]], done[winners[0]]
    result = json.loads((out / "result.json").read_text())
    assert (
        result["config"]["seed"] == seed and json.loads((out / "adapter" / "copra.json").read_text())["seed"] == seed
    )
    assert (
        f"seed {seed}: accuracy {100 * result['accuracy']:.2f}%" in stdout
    )  # the metrics it printed are the ones on disk
    from copra.training.loop import train

    from conftest import tiny_run_config

    again = train(
        tiny_run_config(
            tiny_text_model,
            task="parl_party",
            steps=30,
            seed=seed,
            method="copra",
            eval_examples=12,
            checkpoint_every=1,
        ),
        output_dir=tmp_path / "again",
    )
    on_disk = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(bool((on_disk[k] == again.state[k]).all()) for k in again.state)  # the winner's very adapter
    assert not lock_path(out).exists()


@pytest.mark.slow
def test_a_second_reproduce_on_one_results_folder_is_refused(tiny_text_model, tmp_path, monkeypatch):
    """The first `reproduce` runs in this process and, once it holds the folder, starts a real second one."""
    out = tmp_path / "results"
    second = {}

    def first_suite(out_, *args):  # stands in for the suite's steps, inside the real reproduce()
        process = _copra("reproduce", "-o", str(out), "-q", "--set", f"model={tiny_text_model}", "--set", "seeds=0,1")
        second["code"], second["out"], second["err"] = _finish(process)
        second["files"] = files_under(out)
        return {"report": ()}

    monkeypatch.setattr(suite, "_reproduce", first_suite)
    suite.reproduce("full", out, {"model": tiny_text_model, "seeds": [0, 1]}, progress=False)
    assert second["code"] == 2 and second["err"].count("\n") == 1
    assert f"copra: error: {out} is in use by another copra process (PID {os.getpid()} on " in second["err"]
    assert second["files"] == []  # the refused process wrote nothing


@pytest.mark.slow
def test_a_run_sigkilled_while_holding_the_lock_resumes_without_clean_up(tiny_text_model, tmp_path):
    from copra.training.checkpoint import latest_checkpoint

    out = tmp_path / "run"
    sets = train_sets(tiny_text_model, out, steps=40)
    process = _copra("train", *sets)
    deadline = time.monotonic() + 120
    while latest_checkpoint(out / "checkpoints") is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, process.communicate()[1]
    assert holder(out)["pid"] == process.pid  # it holds the lock and says so
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close(), process.stderr.close()
    assert lock_path(out).exists()  # the file stays; the kernel dropped the lock with the process
    code, stdout, err = _finish(_copra("train", "--resume", *sets))
    assert code == 0, err
    assert "resumed from the checkpoint at step" in err and "accuracy" in stdout
    assert not lock_path(out).exists()
