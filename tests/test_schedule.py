import math

import pytest

from copra.core.config import TrainConfig
from copra.core.schedule import ascii_plot, exponential, keep_probability, sine
from copra.utils.errors import UserError


def test_paper_schedule_values():
    T = 100
    assert keep_probability(0, T) == 0.0
    assert keep_probability(75, T) == 1.0  # t = 3T/4
    assert keep_probability(100, T) == 1.0  # t = T
    assert keep_probability(30, T) == pytest.approx(4 * 30 / (3 * T))
    assert keep_probability(60, T) == pytest.approx(0.8)


def test_ramp_length_uses_ceil():
    # ramp_steps = ceil(0.75 * 10) = 8
    assert keep_probability(4, 10) == pytest.approx(0.5)
    assert keep_probability(8, 10) == 1.0
    assert keep_probability(7, 10) == pytest.approx(7 / 8)


def test_initial_final_and_fraction():
    assert keep_probability(0, 100, initial_p=0.1) == pytest.approx(0.1)
    assert keep_probability(25, 100, initial_p=0.1, ramp_fraction=0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert keep_probability(99, 100, initial_p=0.2, final_p=0.8) == pytest.approx(0.8)
    assert keep_probability(50, 100, ramp_fraction=1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("ramp", [exponential, sine])
def test_other_ramps_share_end_points_and_are_monotone(ramp):
    T = 40
    values = [ramp(t, T) for t in range(T + 1)]
    assert values[0] == 0.0 and values[30] == pytest.approx(1.0) and values[-1] == pytest.approx(1.0)
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))


def test_ramp_shapes_differ():
    assert exponential(15, 40) < keep_probability(15, 40)  # slow start
    assert sine(15, 40) == pytest.approx(0.5)  # half way up the ramp
    assert sine(3, 40) < keep_probability(3, 40)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(total_steps=0),
        dict(total_steps=-3),
        dict(initial_p=-0.1),
        dict(final_p=1.5),
        dict(initial_p=math.nan),
        dict(ramp_fraction=0.0),
        dict(ramp="cubic"),
    ],
)
def test_bad_parameters_are_refused(kwargs):
    args = dict(step=1, total_steps=10) | kwargs
    with pytest.raises(UserError):
        keep_probability(**args)


def test_ascii_plot_rises():
    plot = ascii_plot(total_steps=100, width=20, height=5)
    lines = plot.splitlines()
    assert lines[0].endswith("*" * 5)  # the top row is the p=1 plateau (last quarter)
    assert lines[4][3] == "*"  # starts at p=0


def test_lr_schedules_hold_the_peak_through_the_ramp_or_decay_from_the_start():
    from copra.core.schedule import learning_rate

    cosine = [learning_rate(t, 100, 1.0, 0.0) for t in range(100)]
    held = [learning_rate(t, 100, 1.0, 0.0, "hold_then_cosine", 0.75) for t in range(100)]
    assert cosine[0] == 1.0 and cosine[-1] == pytest.approx(0.0) and cosine[75] < 0.2  # the paper's: low when p hits 1
    assert held[:75] == [1.0] * 75 and held[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(held[75:], held[76:]))  # decays monotonically after the ramp
    assert [learning_rate(t, 10, 0.3, 0.0, "constant") for t in (0, 9)] == [0.3, 0.3]
    with pytest.raises(UserError, match="lr_schedule"):
        learning_rate(0, 10, 1.0, 0.0, "step")
    with pytest.raises(UserError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_gate_schedule_is_the_one_p_of_t():
    import dataclasses

    from copra.core.schedule import GateSchedule

    schedule = GateSchedule(40, initial_p=0.1, final_p=0.9, ramp_fraction=0.5, ramp="sine")
    assert [schedule.keep_probability(t) for t in range(40)] == [
        keep_probability(t, 40, 0.1, 0.9, 0.5, "sine") for t in range(40)
    ]
    assert schedule.keep_probability(20) == 0.9 and schedule.keep_probability(0) == pytest.approx(0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.final_p = 1.0
    with pytest.raises(UserError, match="step must be >= 0"):
        schedule.keep_probability(-1)
    # built from one, or from total_steps (positional or keyword) and the other fields
    assert GateSchedule.of(schedule) is schedule
    assert GateSchedule.of(40, initial_p=0.1, final_p=0.9, ramp_fraction=0.5, ramp="sine") == schedule
    assert GateSchedule.of(total_steps=40, ramp="sine", initial_p=0.1, final_p=0.9, ramp_fraction=0.5) == schedule
    with pytest.raises(TypeError, match="not both"):
        GateSchedule.of(schedule, initial_p=0.2)
    with pytest.raises(TypeError, match="twice"):
        GateSchedule.of(40, total_steps=40)


@pytest.mark.parametrize(
    "fields", [dict(total_steps=0), dict(initial_p=1.5), dict(ramp_fraction=0.0), dict(ramp="cubic")]
)
def test_gate_schedule_refuses_bad_fields(fields):
    from copra.core.schedule import GateSchedule

    with pytest.raises(UserError):
        GateSchedule(**({"total_steps": 10} | fields))


def test_train_config_keeps_flat_schedule_fields():
    from copra.core.schedule import GateSchedule

    config = TrainConfig(steps=30, initial_p=0.2, ramp_fraction=0.5, ramp="exponential")
    assert config.gate_schedule() == GateSchedule(30, 0.2, 1.0, 0.5, "exponential")
    with pytest.raises(UserError, match="ramp must be one of"):
        TrainConfig(ramp="cubic")
