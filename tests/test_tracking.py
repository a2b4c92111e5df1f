"""TrainConfig.report_to: the training loop's per-step values, read back from Accelerate's TensorBoard tracker."""

from __future__ import annotations

import pytest

from copra.training.loop import lr_at, train
from copra.utils.errors import UserError

from conftest import interrupted_run, tiny_run_config

TAGS = ("train/loss", "train/lr", "copra/keep_probability", "copra/active_fraction")


def logged(out) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar TensorBoard holds for the run in `out`, by tag."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "copra"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_each_step_logs_loss_lr_the_schedules_p_and_the_gates_fraction(tiny_text_model, tmp_path):
    pytest.importorskip("tensorboard")
    config = tiny_run_config(tiny_text_model, method="copra", steps=8, report_to="tensorboard")
    result = train(config, output_dir=tmp_path / "run")
    values = logged(tmp_path / "run")
    assert set(TAGS) <= set(values)
    assert all([step for step, _ in values[tag]] == list(range(8)) for tag in TAGS)  # one point per optimizer step
    schedule = config.gate_schedule()
    p = [value for _, value in values["copra/keep_probability"]]
    assert p == pytest.approx([schedule.keep_probability(t) for t in range(8)], abs=1e-7)  # float32 in the file
    active = [value for _, value in values["copra/active_fraction"]]
    assert all(0.0 <= a <= 1.0 for a in active)
    assert active == pytest.approx([sum(mask) / len(mask) for mask in result.masks], abs=1e-7)
    assert active[0] == pytest.approx(1 / 3) and active[-1] == 1.0  # p(0) = 0 keeps one of 3 blocks; p(T-1) = 1
    assert [v for _, v in values["train/loss"]] == pytest.approx(result.losses, rel=1e-6)
    assert [v for _, v in values["train/lr"]] == pytest.approx([lr_at(t, config) for t in range(8)], rel=1e-6)


def test_lora_logs_every_gate_on(tiny_text_model, tmp_path):
    pytest.importorskip("tensorboard")
    train(tiny_run_config(tiny_text_model, method="lora", steps=3, report_to="tensorboard"), output_dir=tmp_path)
    values = logged(tmp_path)
    assert values["copra/keep_probability"] == values["copra/active_fraction"] == [(0, 1.0), (1, 1.0), (2, 1.0)]


def test_a_resumed_run_continues_its_log_and_a_fresh_one_starts_over(tiny_text_model, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    config = tiny_run_config(tiny_text_model, steps=6, checkpoint_every=2, report_to="tensorboard")
    out = tmp_path / "run"
    interrupted_run(config, out, at_step=4, monkeypatch=monkeypatch)
    assert [step for step, _ in logged(out)["train/loss"]] == [0, 1, 2, 3]  # flushed although the run was killed
    resumed = train(config, output_dir=out, resume=True)
    assert resumed.resumed_from == 4
    loss = logged(out)["train/loss"]
    assert [step for step, _ in loss] == list(range(6))
    assert [v for _, v in loss[4:]] == pytest.approx(resumed.losses[4:], rel=1e-6)
    train(config.replace(steps=2, checkpoint_every=0), output_dir=out)  # a fresh run here (what --force trains)
    assert [step for step, _ in logged(out)["train/loss"]] == [0, 1]  # the earlier run's logs are gone


def test_report_to_is_checked_before_anything_is_written(tiny_text_model, tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"report_to must be one of \['none', 'tensorboard', 'mlflow'\], got 'wandb'"):
        tiny_run_config(tiny_text_model, report_to="wandb")
    monkeypatch.setattr("accelerate.utils.is_mlflow_available", lambda: False)
    config = tiny_run_config(tiny_text_model, report_to="mlflow")
    with pytest.raises(UserError, match="report_to=mlflow needs the mlflow package: pip install mlflow"):
        train(config, output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="logs into the run's output folder"):
        train(config.replace(report_to="tensorboard"))  # no folder to log into
