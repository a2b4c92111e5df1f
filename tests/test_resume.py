"""Crash-safe training: SIGKILL at random points, `copra train --resume`, the same adapter bit for bit.

Also: a torn checkpoint write is ignored, a changed config is refused, the CLI never silently
overwrites a run, and a NaN loss stops training with the last good checkpoint kept.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from copra.cli import main
from copra.training import loop as training
from copra.training.checkpoint import CHECKPOINTS_DIR, latest_checkpoint, load_checkpoint
from copra.training.loop import TrainingDiverged, train
from copra.utils.errors import UserError

from conftest import interrupted_run, tiny_run_config

WEIGHTS = Path("adapter") / "adapter_model.safetensors"


def _sets(model: str, out: Path, steps: int, **extra) -> list[str]:
    values = (
        dict(
            model=model,
            task="parl_party",
            method="copra",
            shots=2,
            steps=steps,
            batch_size=4,
            eval_examples=12,
            max_length=16,
            progress="false",
            checkpoint_every=1,
            save_early="true",
            output_dir=str(out),
        )
        | extra
    )
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _config(model: str, out: Path, steps: int, **extra):
    return tiny_run_config(
        model,
        task="parl_party",
        method="copra",
        shots=2,
        steps=steps,
        batch_size=4,
        eval_examples=12,
        checkpoint_every=1,
        save_early=True,
        output_dir=str(out),
        **extra,
    )


def _assert_same_adapter(folder_a: Path, folder_b: Path) -> None:
    a, b = load_file(str(folder_a / WEIGHTS)), load_file(str(folder_b / WEIGHTS))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[0]}"


def _newest_step(out: Path) -> int:
    folder = latest_checkpoint(out / CHECKPOINTS_DIR)
    return int(folder.name.split("-")[1]) if folder is not None else 0


def _writing(out: Path) -> bool:
    """Whether a checkpoint's temporary folder exists (a write in progress, or torn by a kill)."""
    try:
        return any(".tmp-" in entry.name for entry in os.scandir(out / CHECKPOINTS_DIR))
    except OSError:
        return False


# `copra train` that stops itself (SIGSTOP) inside the write of checkpoint step-N, after the tensors
# went into the temporary folder and before state.json and the rename: the test's hook for a kill that
# always lands mid-write. It lives here, not in copra, so an ordinary run pays nothing for it.
STOP_INSIDE_WRITE = """
import os, signal, sys
from pathlib import Path
import copra.training.checkpoint as checkpoint
from copra.cli import main

stop_at, real_save = "." + checkpoint.checkpoint_name(int(sys.argv.pop(1))) + ".tmp-", checkpoint.save_file

def save_then_stop(tensors, path, *args, **kwargs):
    real_save(tensors, path, *args, **kwargs)
    if Path(path).parent.name.startswith(stop_at):
        os.kill(os.getpid(), signal.SIGSTOP)

checkpoint.save_file = save_then_stop
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(tiny_text_model, tmp_path):
    """Kill a real `copra train` process with SIGKILL (before its first checkpoint, mid-step and
    mid-checkpoint-write), resume until it finishes, compare with an uninterrupted run."""
    steps = 40
    reference = tmp_path / "reference"
    train(_config(tiny_text_model, reference, steps), output_dir=reference)

    out = tmp_path / "killed"
    arguments = ["train", "--resume", *_sets(tiny_text_model, out, steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rng = random.Random(6)
    # a random moment before training starts, then somewhere inside a random step, then inside the
    # write of a random checkpoint (the process stops itself there: no timing involved)
    plan = [
        ("startup", None),
        ("mid-step", rng.randrange(2, steps // 2)),
        ("mid-write", rng.randrange(steps // 2, steps - 4)),
    ]
    deadline = time.monotonic() + 240
    kills = []
    for kind, target in plan + [("finish", None)]:
        hook = ["-c", STOP_INSIDE_WRITE, str(target)] if kind == "mid-write" else ["-m", "copra"]
        process = subprocess.Popen(
            [sys.executable, *hook, *arguments], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if kind == "finish":
            stdout, stderr = process.communicate(timeout=max(10.0, deadline - time.monotonic()))
            assert process.returncode == 0, stderr
            break
        if kind == "startup":
            time.sleep(rng.uniform(0.2, 1.5))
        elif kind == "mid-step":
            while _newest_step(out) < target and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.05))
        else:  # until the process has stopped itself inside the write (or ended: a failure below)
            event = os.waitid(os.P_PID, process.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
            assert event.si_code == os.CLD_STOPPED, f"the run never stopped in the write of step {target}"
        assert process.poll() is None, f"the run ended before the {kind} kill: {process.communicate()[1]}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close(), process.stderr.close()
        torn = _writing(out)
        newest = latest_checkpoint(out / CHECKPOINTS_DIR)
        if newest is not None:
            load_checkpoint(newest)  # whatever the moment of the kill, the newest checkpoint is complete
        kills.append((kind, _newest_step(out), torn))
    print("kills (kind, newest checkpoint after the kill, torn write left behind):", kills)
    assert len(kills) == 3 and kills[1][1] > 0  # the later kills happened mid-training
    assert kills[2] == ("mid-write", plan[2][1] - 1, True)  # step-N was torn; step-(N-1) is the newest
    _assert_same_adapter(reference, out)
    early_a = load_file(str(reference / "early" / "adapter_model.safetensors"))
    early_b = load_file(str(out / "early" / "adapter_model.safetensors"))
    assert all(torch.equal(early_a[k], early_b[k]) for k in early_a)
    assert not (out / CHECKPOINTS_DIR).exists() and not list(out.glob(".*"))  # finished: no checkpoint, no leftovers


def test_torn_writes_are_ignored_and_early_checkpoint_survives(tiny_text_model, tmp_path, monkeypatch):
    steps = 12  # the early checkpoint is at step 3
    reference = tmp_path / "reference"
    expected = train(_config(tiny_text_model, reference, steps), output_dir=reference)
    out = tmp_path / "run"
    config = _config(tiny_text_model, out, steps)
    interrupted_run(config, out, 5, monkeypatch)
    good = load_checkpoint(out / CHECKPOINTS_DIR / "step-00000005")
    assert good.state["early_accuracy"] == expected.early_accuracy  # saved before the kill, not redone
    # what a SIGKILL in the middle of writing checkpoint 6 / deleting checkpoint 4 / writing the adapter leaves
    torn = out / CHECKPOINTS_DIR / ".step-00000006.tmp-x1"
    torn.mkdir()
    (torn / "tensors.safetensors").write_bytes((good.folder / "tensors.safetensors").read_bytes()[:300])
    (out / CHECKPOINTS_DIR / ".step-00000004.trash-77").mkdir()
    (out / ".adapter.tmp-y2").mkdir()
    (out / ".result.json.tmp-z3").write_text("{")
    early_before = (out / "early" / "adapter_model.safetensors").stat().st_mtime_ns

    resumed = train(config, output_dir=out, resume=True)
    assert resumed.resumed_from == 5 and resumed.early_accuracy == expected.early_accuracy
    assert (out / "early" / "adapter_model.safetensors").stat().st_mtime_ns == early_before
    assert resumed.losses == expected.losses and resumed.masks == expected.masks
    assert all(torch.equal(resumed.state[k], expected.state[k]) for k in expected.state)
    _assert_same_adapter(reference, out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "early", "result.json"]

    # killed before the early checkpoint: the resumed run writes it, the same as the uninterrupted one
    out2 = tmp_path / "before_early"
    config2 = _config(tiny_text_model, out2, steps)
    interrupted_run(config2, out2, 2, monkeypatch)
    assert not (out2 / "early").exists()
    train(config2, output_dir=out2, resume=True)
    early_a = load_file(str(reference / "early" / "adapter_model.safetensors"))
    early_b = load_file(str(out2 / "early" / "adapter_model.safetensors"))
    assert all(torch.equal(early_a[k], early_b[k]) for k in early_a)
    _assert_same_adapter(reference, out2)


def _cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_resume_force_and_changed_config(tiny_text_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    interrupted_run(_config(tiny_text_model, out, 6), out, 3, monkeypatch)
    sets = _sets(tiny_text_model, out, 6)

    code, _, err = _cli(capsys, "train", *sets)  # neither --resume nor --force: refuse, touch nothing
    assert code == 2 and "already holds an unfinished run" in err and "--resume" in err and err.count("\n") == 1
    code, _, err = _cli(capsys, "train", "--resume", *sets, "--set", "lr=0.002")
    assert code == 2 and "lr=0.001" in err and "lr=0.002" in err and err.count("\n") == 1
    assert latest_checkpoint(out / CHECKPOINTS_DIR).name == "step-00000003"  # still there after both refusals

    code, stdout, err = _cli(capsys, "train", "--resume", *sets, "--set", "checkpoint_every=2")  # a free field
    assert code == 0 and "resumed from the checkpoint at step 3" in err
    code, stdout, err = _cli(capsys, "train", "--resume", *sets)
    assert code == 0 and "already holds this finished run" in err and "accuracy" in stdout
    code, _, err = _cli(capsys, "train", *sets)
    assert code == 2 and "already holds a finished run" in err
    code, _, err = _cli(capsys, "train", "--resume", "--force", *sets)
    assert code == 2 and "not allowed with argument" in err and err.count("\n") == 1
    code, _, err = _cli(capsys, "train", "--force", *sets, "--set", "seed=1")
    assert code == 0 and (out / "result.json").exists()
    assert '"seed": 1' in (out / "adapter" / "copra.json").read_text()

    fresh = tmp_path / "fresh"
    code, _, err = _cli(capsys, "train", "--resume", *_sets(tiny_text_model, fresh, 3))
    assert code == 0 and "no checkpoint" in err and (fresh / WEIGHTS).exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_text_model, tmp_path, capsys, monkeypatch):
    calls = []
    real = training.F.cross_entropy

    def poisoned(*args, **kwargs):  # the loss of step 4 is NaN
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(training.F, "cross_entropy", poisoned)
    out = tmp_path / "run"
    code, _, err = _cli(capsys, "train", *_sets(tiny_text_model, out, 8))
    assert code == 2 and err.count("\n") == 1
    assert "loss became nan at step 4" in err and "last good checkpoint is kept in" in err and "step-00000004" in err
    assert load_checkpoint(out / CHECKPOINTS_DIR / "step-00000004").step == 4
    assert not (out / "adapter").exists() and not (out / "result.json").exists()

    # settings that blow the weights up: stopped by the loss, the weights or the optimizer, never saved
    monkeypatch.setattr(training.F, "cross_entropy", real)
    for name, lr, decay in (("huge_lr", 1e38, 0.01), ("huge_decay", 1.0, 1e9)):
        with pytest.raises(TrainingDiverged, match="(loss became|weights became|step overflowed) .*lower lr"):
            train(_config(tiny_text_model, tmp_path / name, 12, lr=lr, weight_decay=decay), output_dir=tmp_path / name)
        assert not (tmp_path / name / "adapter").exists()


def test_a_run_recorded_before_a_field_existed_is_reused_only_when_it_computed_the_same(tiny_text_model, tmp_path):
    """A missing key reads as what older runs used: the default (use_dora), or fp32 for precision."""
    from copra.training.run_folder import same_run

    config = tiny_run_config(tiny_text_model, precision="fp32")
    stored = {k: v for k, v in config.to_dict().items() if k not in ("use_dora", "precision")}
    same_run(stored, config, tmp_path)  # both missing keys read as what this run computes
    with pytest.raises(UserError, match="precision='fp32'"):
        same_run(stored, config.replace(precision="bf16"), tmp_path)
    with pytest.raises(UserError, match="use_dora"):
        same_run(stored, config.replace(use_dora=True), tmp_path)


def test_decoder_only_fields_do_not_split_encoder_runs(tiny_text_model, tmp_path):
    """list_choices / answer_score change nothing an encoder run computes: not compared there; on a decoder they are."""
    from copra.training.run_folder import same_run

    config = tiny_run_config(tiny_text_model)
    stored = config.to_dict() | {"list_choices": True, "answer_score": "mean"}
    same_run(stored, config, tmp_path)
    with pytest.raises(UserError, match="answer_score='mean'"):
        same_run(stored | {"backbone": "causal"}, config.replace(backbone="causal"), tmp_path)
    with pytest.raises(UserError, match="belongs to a run with"):  # a decoder's run is never an encoder's
        same_run(stored | {"backbone": "causal"}, config, tmp_path)
