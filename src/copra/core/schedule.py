"""Keep-probability schedules p(t) for CopRA's per-layer Bernoulli gates.

CopRA (Zhuang et al., 2024, Sec. 2.1) keeps LoRA layer l at step t with probability

    p(t) = min(4t / 3T, 1)

so p rises from 0 to 1 over the first three quarters of training, then every adapter is on and
training is plain LoRA. Here the end points and the ramp's length are parameters:

    p(t) = initial_p + (final_p - initial_p) * ramp(min(t / ceil(ramp_fraction * T), 1))

      p
    1 |            ___________
      |          /
      |        /      linear ramp (the paper)
      |      /
      |    /
    0 |__/______________________ t
      0        3T/4          T

`ramp` maps progress u in [0, 1] to [0, 1]: "linear" (u), "exponential" (slow start, fast end) or
"sine" (smooth at both ends). All three share the same end points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from copra.utils.errors import UserError


def _linear(u: float) -> float:
    return u


def _exponential(u: float, sharpness: float = 5.0) -> float:
    # (e^{ku} - 1) / (e^k - 1): 0 at u=0, 1 at u=1, convex in between.
    return math.expm1(sharpness * u) / math.expm1(sharpness)


def _sine(u: float) -> float:
    # Half a cosine period: flat at both ends.
    return 0.5 - 0.5 * math.cos(math.pi * u)


RAMPS: dict[str, Callable[[float], float]] = {
    "linear": _linear,
    "exponential": _exponential,
    "sine": _sine,
}


def check_probability(name: str, value: float) -> None:
    """Raise a UserError unless 0 <= value <= 1 (NaN is refused too)."""
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise UserError(f"{name} must be a probability in [0, 1], got {value!r}")


def validate(total_steps: int, initial_p: float, final_p: float, ramp_fraction: float, ramp: str) -> None:
    """Check schedule parameters once, so errors name the bad value before any work starts."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise UserError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    check_probability("initial_p", initial_p)
    check_probability("final_p", final_p)
    if not (isinstance(ramp_fraction, (int, float)) and 0.0 < ramp_fraction <= 1.0):
        raise UserError(f"ramp_fraction must be in (0, 1], got {ramp_fraction!r}")
    if ramp not in RAMPS:
        raise UserError(f"ramp must be one of {sorted(RAMPS)}, got {ramp!r}")


@dataclass(frozen=True)
class GateSchedule:
    """p(t) of one run, validated once: the gate controller, the Trainer callback and a run's
    TrainConfig (`TrainConfig.gate_schedule()`) all pass this one value instead of five arguments.
    Who the players are (granularity) and which draw they get (seed) belong to the controller."""

    total_steps: int  #: optimizer steps T
    initial_p: float = 0.0  #: keep probability at step 0
    final_p: float = 1.0  #: keep probability once the ramp is over
    ramp_fraction: float = 0.75  #: fraction of T over which p ramps (paper: 3/4)
    ramp: str = "linear"  #: ramp shape, a key of RAMPS

    def __post_init__(self) -> None:
        validate(self.total_steps, self.initial_p, self.final_p, self.ramp_fraction, self.ramp)

    def keep_probability(self, step: int) -> float:
        """p(step): the probability that each player is active at optimizer step `step` (0-based)."""
        if step < 0:
            raise UserError(f"step must be >= 0, got {step!r}")
        ramp_steps = math.ceil(self.ramp_fraction * self.total_steps)
        progress = min(step / ramp_steps, 1.0)
        return self.initial_p + (self.final_p - self.initial_p) * RAMPS[self.ramp](progress)

    @classmethod
    def of(cls, schedule: GateSchedule | int | None = None, **fields) -> GateSchedule:
        """`schedule` itself, or the schedule of `total_steps` (`schedule`, or the keyword) and `fields`.

        How `CopRA(model, total_steps=T, initial_p=...)` keeps its keyword arguments."""
        if isinstance(schedule, GateSchedule):
            if fields:
                raise TypeError(f"give a GateSchedule or its fields ({', '.join(fields)}), not both")
            return schedule
        if schedule is not None:
            if "total_steps" in fields:
                raise TypeError("total_steps given twice")
            fields["total_steps"] = schedule
        return cls(**fields)


def keep_probability(
    step: int,
    total_steps: int,
    initial_p: float = 0.0,
    final_p: float = 1.0,
    ramp_fraction: float = 0.75,
    ramp: str = "linear",
) -> float:
    """p(step) of `GateSchedule(total_steps, initial_p, ...)`; with the defaults the paper's min(4t / 3T, 1)."""
    return GateSchedule(total_steps, initial_p, final_p, ramp_fraction, ramp).keep_probability(step)


def exponential(step: int, total_steps: int, **kwargs) -> float:
    """keep_probability with the exponential ramp (slow start, same end points)."""
    return keep_probability(step, total_steps, ramp="exponential", **kwargs)


def sine(step: int, total_steps: int, **kwargs) -> float:
    """keep_probability with the half-cosine ramp (smooth at both ends, same end points)."""
    return keep_probability(step, total_steps, ramp="sine", **kwargs)


def ascii_plot(total_steps: int = 100, width: int = 40, height: int = 8, **kwargs) -> str:
    """A small text plot of p(t), handy in a terminal or a docstring."""
    rows = [[" "] * width for _ in range(height)]
    for col in range(width):
        step = round(col * (total_steps - 1) / max(width - 1, 1))
        p = keep_probability(step, total_steps, **kwargs)
        row = height - 1 - min(int(p * (height - 1) + 0.5), height - 1)
        rows[row][col] = "*"
    return "\n".join("p |" + "".join(r) for r in rows) + "\n  +" + "-" * width + " t"


# The learning-rate schedule around the keep-probability ramp (issue 12). The paper's cosine decays
# from step 0, so by the time CopRA's ramp switches every adapter on (3T/4) the lr is ~15% of its
# peak: the late layers train mostly at a low lr. "hold_then_cosine" holds the peak lr while p ramps
# and decays over the remaining steps, so full-model training still gets a real lr. LoRA runs use
# the same formula with the same ramp_fraction, so the two methods keep one lr budget.
LR_SCHEDULES = ("cosine", "hold_then_cosine", "constant")


def learning_rate(
    step: int, total_steps: int, peak: float, floor: float, schedule: str = "cosine", ramp_fraction: float = 0.75
) -> float:
    """The lr at optimizer step `step` (0-based): cosine from `peak` to `floor` (the paper), that cosine
    started after the first `ramp_fraction` of training ("hold_then_cosine"), or `peak` throughout."""
    if schedule not in LR_SCHEDULES:
        raise UserError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")
    if schedule == "constant":
        return peak
    start = math.ceil(ramp_fraction * total_steps) if schedule == "hold_then_cosine" else 0
    if step < start:
        return peak
    progress = (step - start) / max(total_steps - 1 - start, 1)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))
