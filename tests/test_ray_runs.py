"""Training runs as Ray tasks (`executor="ray"`): same results as local processes, resume after a kill."""

import json
import os
from pathlib import Path

import pytest
import torch

from copra.experiments import sweep
from copra.experiments.runner import runs
from copra.training.loop import train
from copra.utils.errors import UserError

FAST = dict(shots=2, steps=4, batch_size=4, eval_examples=20, overrides={"max_length": 16}, progress=False)
TESTS = str(Path(__file__).parent)


@pytest.fixture
def no_ray_stats(monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("COPRA_RAY_ADDRESS", raising=False)
    yield
    import ray

    ray.shutdown()  # whatever happened in the test, no Ray is left running


def kill_after_checkpoint():
    """Ray worker setup hook: SIGKILL this worker right after it writes checkpoint $COPRA_TEST_KILL_AT, once."""
    import signal

    from copra.training import loop as training

    at_step, marker = int(os.environ["COPRA_TEST_KILL_AT"]), Path(os.environ["COPRA_TEST_KILL_MARKER"])
    real = training._save_checkpoint

    def save_then_die(out, step, *args):
        folder = real(out, step, *args)
        if step == at_step and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return folder

    training._save_checkpoint = save_then_die


def test_executor_settings_are_checked_before_training(tmp_path):
    plan = [(None, tmp_path / "never")]
    with pytest.raises(UserError, match="executor must be one of"):
        runs.run_all(plan, executor="dask")
    with pytest.raises(UserError, match="ray_address must be a non-empty string"):
        runs.run_all(plan, executor="ray", ray_address=" ")
    with pytest.raises(UserError, match="executor must be one of"):
        sweep.run(sweep.SweepConfig(model="x", grid={}, output_dir=str(tmp_path / "never"), executor="slurm", **FAST))
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_two_worker_ray_gives_the_local_summaries_and_adapters(tiny_text_model, tmp_path, no_ray_stats):
    common = dict(model=tiny_text_model, grid={"lr": [0.01, 0.3]}, seeds=[0, 1], **FAST)
    local = sweep.run(sweep.SweepConfig(output_dir=str(tmp_path / "local"), **common))
    on_ray = sweep.run(sweep.SweepConfig(output_dir=str(tmp_path / "ray"), executor="ray", jobs=2, **common))
    import ray

    assert not ray.is_initialized()  # copra's private local Ray was shut down
    for a, b in zip(local["points"], on_ray["points"], strict=True):
        assert (a["variant"], a["values"]) == (b["variant"], b["values"])
        assert a["single"] == b["single"] and a["merged"] == b["merged"] and len(a["single"]) == 2
    folders = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("adapter"))
    assert len(folders) == 8
    from copra.adapters.io import load_adapter

    for rel in folders:
        (sa, _), (sb, _) = load_adapter(tmp_path / "local" / rel), load_adapter(tmp_path / "ray" / rel)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), rel


@pytest.mark.slow
def test_a_killed_ray_task_resumes_its_run_from_the_checkpoint(tiny_text_model, tmp_path, monkeypatch, no_ray_stats):
    import ray

    config = sweep.SweepConfig(model=tiny_text_model, grid={}, seeds=[0, 1], output_dir="unused", **FAST)
    run_config = config.run_config("CopRA", {}, 0).replace(checkpoint_every=1, steps=6)
    whole = train(run_config, output_dir=tmp_path / "whole")
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={
            "worker_process_setup_hook": "test_ray_runs.kill_after_checkpoint",
            "env_vars": {"COPRA_TEST_KILL_AT": "4", "COPRA_TEST_KILL_MARKER": str(marker)},
        },
    )
    (resumed,) = runs.run_all([(run_config, tmp_path / "killed")], executor="ray")  # uses the Ray started here
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a Ray worker died at step 4
    recorded = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert recorded["resumed_from"] == 4  # Ray's retry continued from the checkpoint, not from step 0
    assert all(torch.equal(resumed.state[k], whole.state[k]) for k in whole.state)
    assert ray.is_initialized()  # a Ray the caller started is left running


def test_ray_address_comes_from_the_setting_then_the_environment(monkeypatch):
    from copra.experiments.runner.ray_tasks import resolve_address

    monkeypatch.delenv("COPRA_RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None  # a private local Ray
    monkeypatch.setenv("COPRA_RAY_ADDRESS", "ray://head:10001")
    assert resolve_address(None) == "ray://head:10001"
    assert resolve_address("auto") == "auto"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["federated", "--executor", "ray"], "federated runs in this process; --executor"),
        (["sweep", "--set", "executor=slurm"], "executor must be one of ['local', 'ray']"),
        (["sweep", "--executor", "dask"], "invalid choice: 'dask'"),
        (["reproduce", "--executor", "ray", "--jobs", "0"], "jobs must be a positive integer"),
        (["reproduce", "--executor", "ray", "--ray-address", ""], "ray_address must be a non-empty string"),
    ],
)
def test_executor_arguments_are_one_line_errors(capsys, tmp_path, tiny_text_model, argv, message):
    from copra.cli import main

    out = tmp_path / "never"
    code = main([*argv, "-o", str(out), *(["--set", f"model={tiny_text_model}"] if argv[0] == "sweep" else [])])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()
