"""copra.analysis.stats: the t quantile against printed tables, paired intervals by hand, the three verdicts."""

from __future__ import annotations

import math

import pytest

from copra.analysis.stats import (
    HELD,
    NO_DIFFERENCE,
    REVERSED,
    compare,
    disjoint_pairs,
    incomplete_beta,
    plateau,
    t_cdf,
    t_quantile,
)

# Student's t, two-sided 95% / 90% / 99% critical values (any statistics textbook's table, 3 decimals)
TABLE = {
    (0.975, 1): 12.706,
    (0.975, 2): 4.303,
    (0.975, 3): 3.182,
    (0.975, 4): 2.776,
    (0.975, 5): 2.571,
    (0.975, 9): 2.262,
    (0.975, 10): 2.228,
    (0.975, 30): 2.042,
    (0.95, 4): 2.132,
    (0.95, 1): 6.314,
    (0.995, 4): 4.604,
    (0.995, 1): 63.657,
    (0.9, 10): 1.372,
}


@pytest.mark.parametrize("p, df", sorted(TABLE))
def test_t_quantile_matches_the_printed_table(p, df):
    assert t_quantile(p, df) == pytest.approx(TABLE[p, df], abs=6e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-TABLE[p, df], abs=6e-4)


def test_t_distribution_closed_forms():
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)  # the normal limit
    assert incomplete_beta(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - sum_{k<2} C(4,k) .4^k .6^(4-k)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_t_quantile_agrees_with_scipy_when_present():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 19, 50):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_hand_checked_interval():
    # differences 0.02, 0.04, 0.03, 0.05, 0.01: mean 0.03, sd sqrt(0.001/4) = 0.015811, se 0.0070711
    # half width 2.776445 * 0.0070711 = 0.019632
    c = compare([0.82, 0.84, 0.83, 0.85, 0.81], [0.80] * 5)
    assert (c.n, c.verdict) == (5, HELD)
    assert c.difference == pytest.approx(0.03) and c.sd == pytest.approx(0.0158114, abs=1e-7)
    assert c.low == pytest.approx(0.03 - 0.019632, abs=1e-6) and c.high == pytest.approx(0.03 + 0.019632, abs=1e-6)
    # three seeds, differences 1, 2, 6: mean 3, sd sqrt(7), 90%: t_{0.95,2} = 2.919986; a gain, but not shown
    c = compare([1, 2, 6], [0, 0, 0], confidence=0.9)
    assert c.low == pytest.approx(3 - 2.919986 * math.sqrt(7 / 3), abs=1e-5) and c.verdict == NO_DIFFERENCE  # -1.46


@pytest.mark.parametrize(
    "treatment, control, expected",
    [
        ([0.84, 0.86, 0.85, 0.83, 0.87], [0.80, 0.81, 0.79, 0.80, 0.82], HELD),  # a clear win
        ([0.70, 0.72, 0.69, 0.71, 0.70], [0.80, 0.81, 0.79, 0.80, 0.82], REVERSED),  # a clear loss
        ([0.81, 0.79, 0.82, 0.78, 0.80], [0.80, 0.80, 0.80, 0.80, 0.80], NO_DIFFERENCE),  # a tie
        ([0.90, 0.70], [0.80, 0.80], NO_DIFFERENCE),  # a large mean gap, but seeds disagree
    ],
)
def test_three_verdicts_on_constructed_pairs(treatment, control, expected):
    c = compare(treatment, control)
    assert c.verdict == expected
    assert c.low <= c.difference <= c.high


def test_pairing_matters():
    # the same values unpaired would overlap; paired, every seed gains 0.01
    treatment, control = [0.61, 0.71, 0.81, 0.91], [0.60, 0.70, 0.80, 0.90]
    assert compare(treatment, control).verdict == HELD
    assert compare(treatment, control[::-1]).verdict == NO_DIFFERENCE


def test_one_seed_has_no_interval():
    c = compare([0.9], [0.1])
    assert (c.difference, c.low, c.high, c.verdict, c.sd) == (pytest.approx(0.8), None, None, NO_DIFFERENCE, None)


@pytest.mark.parametrize(
    "treatment, control, confidence",
    [([], [], 0.95), ([1.0, 2.0], [1.0], 0.95), ([1.0, float("nan")], [1.0, 1.0], 0.95), ([1.0, 2.0], [0, 0], 1.0)],
)
def test_bad_input_raises(treatment, control, confidence):
    with pytest.raises(ValueError):
        compare(treatment, control, confidence)


def test_wider_confidence_gives_a_wider_interval():
    a, b = [0.83, 0.85, 0.80, 0.86], [0.80, 0.81, 0.80, 0.80]
    narrow, wide = compare(a, b, 0.8), compare(a, b, 0.99)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_disjoint_pairs():
    assert disjoint_pairs([(0, 1), (0, 2), (1, 2), (2, 3)]) == [0, 3]
    assert disjoint_pairs([(0, 1), (1, 2), (2, 3), (3, 4)]) == [0, 2]


def test_plateau_on_constructed_losses():
    flat = [1.0 + 0.01 * (-1) ** i for i in range(40)]  # noise around a level: plateaued
    assert plateau(flat).converged is True and plateau(flat).window == 5
    falling = [2.0 * 0.97**i for i in range(40)]  # still falling 3% a step: windowed means 14% apart
    p = plateau(falling)
    assert p.converged is False and p.improvement == pytest.approx(1 - 0.97**5, abs=1e-12)
    assert plateau([0.04, 0.03] * 10 + [0.02] * 10).converged is True  # fitted: converged whatever its relative change
    assert plateau([1.0] * 9).converged is None  # shorter than two windows: not judged
    # the pilot of issue 12: CopRA's 25-step windows went 1.975 -> 1.908 (3.4%): still learning
    assert plateau([1.975] * 25 + [1.908] * 25, window=25).converged is False
    assert plateau([1.0] * 25 + [0.99] * 25, window=25).converged is True
    assert plateau([1.86] * 25 + [0.61] * 25, window=25).converged is False
