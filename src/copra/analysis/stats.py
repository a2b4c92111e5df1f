"""Paired comparisons of CopRA against LoRA over seeds: mean difference, confidence interval, verdict.

Why a paired t-interval over seeds:

* The seed is the unit of replication. One seed fixes the few-shot sample, the initial A, the batch
  order and the evaluation set for *both* methods, so CopRA's and LoRA's scores of one seed are a
  pair, and the differences d_s = treatment_s - control_s remove what the seed shares.
* Runs here have 2-5 seeds. A bootstrap over 5 values has 126 distinct resamples and its percentile
  interval is known to be too narrow at such sizes; the t-interval is exact when the differences
  are normal and stays honest (wide) with few seeds: t_{0.975} is 12.7 with 2 seeds, 2.78 with 5.
* The evaluation examples' noise is inside each seed's score, and the evaluation set is fixed, so
  the interval speaks about this test split. The summaries keep per-seed scores only; where every
  example's score is stored, `copra.analysis.protocol.bootstrap_paired` resamples examples as well.

    d_bar = mean(d),  s = stdev(d),  interval = d_bar -/+ t_{(1+c)/2, n-1} * s / sqrt(n)

Verdict: "held" when the interval lies above 0 (the treatment is better), "reversed" when it lies
below 0, "no difference shown" otherwise. One seed has no interval: "no difference shown". Scores
must come from independent seeds: merged accuracies of overlapping seed pairs ((0,1), (1,2), ...)
share adapters and are not independent (`disjoint_pairs` picks the pairs that are).

The t quantile is scipy's (`scipy.stats.t.ppf`), imported on first use: `import copra` loads this
module, and scipy.stats costs most of a second to import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

HELD, REVERSED, NO_DIFFERENCE = "held", "reversed", "no difference shown"
VERDICTS = (HELD, REVERSED, NO_DIFFERENCE)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (`scipy.stats.t.cdf`)."""
    from scipy.stats import t as student_t

    return float(student_t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (`scipy.stats.t.ppf`); ValueError outside 0 < p < 1, df > 0."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p!r}, df={df!r}")
    from scipy.stats import t as student_t

    return float(student_t.ppf(p, df))


@dataclass(frozen=True)
class Comparison:
    """Treatment minus control over paired seeds; `low`/`high` are None with a single seed."""

    difference: float  #: mean of treatment_s - control_s
    low: float | None  #: lower end of the confidence interval
    high: float | None  #: upper end
    verdict: str  #: "held", "reversed" or "no difference shown"
    n: int  #: number of pairs (seeds)
    confidence: float  #: e.g. 0.95
    sd: float | None = None  #: sample standard deviation of the differences (None with one pair)


def verdict(low: float | None, high: float | None) -> str:
    """Held above 0, reversed below 0, otherwise (or without an interval) no difference shown."""
    if low is None or high is None:
        return NO_DIFFERENCE
    return HELD if low > 0 else REVERSED if high < 0 else NO_DIFFERENCE


def compare(treatment: Sequence[float], control: Sequence[float], confidence: float = 0.95) -> Comparison:
    """Paired t-interval of mean(treatment - control) over seeds (higher scores are better)."""
    treatment, control = [float(v) for v in treatment], [float(v) for v in control]
    if len(treatment) != len(control) or not treatment:
        raise ValueError(
            f"compare needs paired scores of equal, non-zero length, got {len(treatment)} and {len(control)}"
        )
    if not all(math.isfinite(v) for v in treatment + control):
        raise ValueError("compare needs finite scores")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    d = [a - b for a, b in zip(treatment, control)]
    n, mean = len(d), math.fsum(d) / len(d)
    if n == 1:
        return Comparison(mean, None, None, NO_DIFFERENCE, 1, confidence)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    return Comparison(mean, low, high, verdict(low, high), n, confidence, sd)


def disjoint_pairs(pairs: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of pairs that share no member with an earlier kept pair (greedy, in order).

    (0,1), (0,2), (1,2), (2,3) -> [0, 3]: the merged accuracies of the kept pairs come from
    different adapters, so they are independent replicates for `compare`.
    """
    used: set[int] = set()
    kept = []
    for index, (a, b) in enumerate(pairs):
        if a not in used and b not in used and a != b:
            kept.append(index)
            used.update((a, b))
    return kept


# ----------------------------------------------------------------------------- convergence of a training loss
PLATEAU_THRESHOLD = 0.02  # relative improvement of the windowed mean loss below which a run has plateaued
PLATEAU_FLOOR = 0.05  # a windowed mean cross-entropy at or below this (the training set fitted) counts as converged
MIN_WINDOW = 5  # steps


@dataclass(frozen=True)
class Plateau:
    """Did a training loss plateau? `converged` is None when the run is too short to tell."""

    converged: bool | None
    improvement: float | None  #: (mean of the window before the last - mean of the last) / the former
    window: int  #: steps per window
    last_mean: float | None  #: mean loss over the last window
    threshold: float = PLATEAU_THRESHOLD

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def plateau(
    losses: Sequence[float],
    window: int | None = None,
    threshold: float = PLATEAU_THRESHOLD,
    floor: float = PLATEAU_FLOOR,
) -> Plateau:
    """The plateau test: the mean loss of the last `window` steps improved on the window before it by
    less than `threshold` (relative), or is at most `floor`.

    Window: a tenth of the run (at least `MIN_WINDOW` steps), so batch-to-batch noise of few-shot
    losses averages out. A run shorter than two windows is not judged (None). Caveat: a cosine
    schedule flattens any loss curve near its end (the lr goes to its floor), so a plateau under
    cosine says "no more progress at this length", not "no more progress possible"; comparing
    lengths (the converged suite) or a constant lr after the ramp tells the two apart.
    """
    losses = [float(v) for v in losses]
    window = window or max(MIN_WINDOW, math.ceil(len(losses) / 10))
    if len(losses) < 2 * window or not all(math.isfinite(v) for v in losses):
        return Plateau(None, None, window, None, threshold)
    before = math.fsum(losses[-2 * window : -window]) / window
    last = math.fsum(losses[-window:]) / window
    improvement = (before - last) / before if before > 0 else 0.0
    return Plateau(improvement < threshold or last <= floor, improvement, window, last, threshold)
