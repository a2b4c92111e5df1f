"""copra.analysis.shapley on toy games whose Shapley values are known in closed form or by brute force."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from copra.analysis.shapley import ESTIMATORS, Game, ShapleyResult, exact, multilinear, permutation
from copra.utils.errors import UserError

W = np.array([0.5, -1.0, 2.0, 0.25, 1.5])


def additive(mask):
    return 3.0 + float(np.dot(mask, W))


def symmetric(mask):
    k = sum(mask)
    return k**2 + math.sin(k)


def majority(mask, weights=(3, 2, 1, 1), quota=4):
    return float(sum(w for w, on in zip(weights, mask) if on) >= quota)


def interacting(mask):
    """A non-additive game on 6 players: squares, a pairwise synergy and a veto-ish term."""
    m = np.asarray(mask, dtype=float)
    w = np.array([1.0, 0.5, -0.3, 2.0, 0.7, 1.2])
    return float(np.dot(m, w) ** 2 + 1.5 * m[0] * m[3] - 2.0 * m[1] * m[2] * m[5])


def brute_force(value, n):
    """Average marginal contribution over all n! orders."""
    phi = np.zeros(n)
    for order in itertools.permutations(range(n)):
        mask = [False] * n
        before = value(tuple(mask))
        for player in order:
            mask[player] = True
            after = value(tuple(mask))
            phi[player] += after - before
            before = after
    return phi / math.factorial(n)


def batched(value):
    return lambda masks: np.array([value(tuple(row)) for row in masks.tolist()])


# -- exact ---------------------------------------------------------------------------------------
def test_exact_additive_game_gives_the_weights():
    result = exact(additive, len(W))
    np.testing.assert_allclose(result.values, W, atol=1e-12)
    assert result.v_empty == 3.0 and result.v_full == pytest.approx(3.0 + W.sum())
    assert result.evaluations == 2 ** len(W) and result.method == "exact"
    assert np.all(result.stderr == 0)


def test_exact_symmetric_game_splits_evenly():
    n = 6
    result = exact(symmetric, n)
    np.testing.assert_allclose(result.values, (symmetric([True] * n) - symmetric([False] * n)) / n, atol=1e-12)


def test_exact_weighted_majority_game():
    # weights (3, 2, 1, 1), quota 4. The big player is pivotal after any 1 or 2 of the others
    # (3 + 3 sets, Shapley weight 1/12 each): 1/2. Each small one is pivotal after exactly one
    # size-1 and one size-2 predecessor set: 1/6.
    result = exact(majority, 4)
    np.testing.assert_allclose(result.values, [1 / 2, 1 / 6, 1 / 6, 1 / 6], atol=1e-12)
    np.testing.assert_allclose(result.values, brute_force(majority, 4), atol=1e-12)


def test_exact_matches_brute_force_on_random_game():
    table = np.random.default_rng(5).normal(size=2**6)

    def value(mask):
        return float(table[sum(1 << i for i, on in enumerate(mask) if on)])

    result = exact(value, 6)
    np.testing.assert_allclose(result.values, brute_force(value, 6), atol=1e-12)
    assert abs(result.values.sum() - (result.v_full - result.v_empty)) < 1e-9


def test_exact_single_player():
    result = exact(lambda m: 5.0 if m[0] else 2.0, 1)
    assert result.values.tolist() == [3.0]


def test_exact_refuses_too_many_and_zero_players():
    with pytest.raises(UserError, match="multilinear"):
        exact(additive, 17)
    with pytest.raises(UserError, match="max_players=4"):
        exact(additive, 5, max_players=4)
    for estimator in (
        lambda: exact(additive, 0),
        lambda: permutation(additive, 0, 10),
        lambda: multilinear(additive, 0, 10),
    ):
        with pytest.raises(UserError, match="empty player list"):
            estimator()


# -- samplers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("antithetic", [False, True])
def test_permutation_is_efficient_per_sample(antithetic):
    result = permutation(interacting, 6, 7, seed=3, antithetic=antithetic)
    assert abs(result.values.sum() - (result.v_full - result.v_empty)) < 1e-9
    assert result.samples == (8 if antithetic else 7)


def test_multilinear_is_efficient_within_its_error():
    result = multilinear(interacting, 6, 400, seed=1, exact_when_affordable=False)
    gap = abs(result.values.sum() - (result.v_full - result.v_empty))
    assert gap < 4 * result.stderr.sum()  # std of a sum <= sum of stds


def test_multilinear_is_exact_on_an_additive_game():
    result = multilinear(additive, len(W), 8, seed=0, exact_when_affordable=False)
    np.testing.assert_allclose(result.values, W, atol=1e-12)
    # the marginals are constant but differ between players: the floor keeps the stderr honest, ~d/m
    assert np.all(result.stderr > 0) and np.all(result.stderr < np.ptp(W) / 4)


@pytest.mark.parametrize(
    "estimate",
    [
        lambda s, seed: permutation(interacting, 6, s, seed, exact_when_affordable=False),
        lambda s, seed: permutation(interacting, 6, s, seed, antithetic=True, exact_when_affordable=False),
        lambda s, seed: multilinear(interacting, 6, s, seed, exact_when_affordable=False),
        lambda s, seed: multilinear(interacting, 6, s, seed, antithetic=False, exact_when_affordable=False),
    ],
    ids=["permutation", "permutation-antithetic", "multilinear", "multilinear-plain"],
)
def test_samplers_converge_to_exact(estimate):
    truth = exact(interacting, 6).values
    errors = []
    for samples in (40, 640):
        # RMS error over a few seeds, so one lucky draw cannot decide the comparison
        runs = [estimate(samples, seed) for seed in range(4)]
        errors.append(np.sqrt(np.mean([(r.values - truth) ** 2 for r in runs])))
    assert errors[1] < errors[0] / 2
    big = estimate(4000, 0)
    assert np.all(np.abs(big.values - truth) <= 5 * big.stderr + 1e-9)


def test_samplers_on_majority_game():
    truth = np.array([1 / 2, 1 / 6, 1 / 6, 1 / 6])
    for result in (
        permutation(majority, 4, 2000, seed=0, exact_when_affordable=False),
        multilinear(majority, 4, 2000, seed=0, exact_when_affordable=False),
    ):
        np.testing.assert_allclose(result.values, truth, atol=0.05)


def test_multilinear_symmetric_game():
    n = 8
    result = multilinear(symmetric, n, 1000, seed=2, exact_when_affordable=False)
    expected = (symmetric([True] * n) - symmetric([False] * n)) / n
    assert np.all(np.abs(result.values - expected) <= 5 * result.stderr)


@pytest.mark.parametrize("name", ["permutation", "multilinear"])
def test_samplers_reproducible_by_seed(name):
    run = ESTIMATORS[name]
    a, b, c = (run(interacting, 6, 50, seed, exact_when_affordable=False) for seed in (7, 7, 8))
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.stderr, b.stderr)
    assert not np.array_equal(a.values, c.values)


# -- exact when affordable, a standard error that is not falsely 0 ------------------------------------
@pytest.mark.parametrize("name", ["permutation", "multilinear"])
def test_samplers_switch_to_exact_when_the_budget_covers_every_coalition(name):
    # n = 6: 2^6 = 64 coalitions. permutation: 13 * 5 + 2 = 67 >= 64; multilinear: 10 * 7 + 2 = 72 >= 64
    samples = {"permutation": 13, "multilinear": 10}[name]
    counted, calls = counting(interacting)
    result = ESTIMATORS[name](counted, 6, samples, seed=3)
    assert result.method == "exact" and result.samples == 0 and len(calls) == 2**6
    np.testing.assert_allclose(result.values, brute_force(interacting, 6), atol=1e-12)
    np.testing.assert_array_equal(result.stderr, 0)
    # one permutation (or antithetic pair) fewer: the budget is short of 2^6, so it samples
    below = ESTIMATORS[name](interacting, 6, samples - (1 if name == "permutation" else 2), seed=3)
    assert below.method == name and below.samples > 0
    assert not np.allclose(below.values, result.values)


def test_exact_when_affordable_respects_max_players():
    # 17 players: 2^17 coalitions exceed the exact enumerator's limit, whatever the budget
    result = permutation(lambda m: float(sum(m)), 17, 10_000, seed=0)
    assert result.method == "permutation"


def threshold(mask, quota=3):
    """A 0/1 game on 6 players: 1 once the weighted count reaches the quota (marginals are 0 or 1)."""
    weights = (2, 1, 1, 1, 1, 1)
    return float(sum(w for w, on in zip(weights, mask) if on) >= quota)


@pytest.mark.parametrize("name", ["permutation", "multilinear"])
def test_zero_one_game_gets_a_nonzero_stderr_for_every_player(name):
    truth = exact(threshold, 6).values
    for seed in range(20):
        samples = 4 if name == "multilinear" else 3
        result = ESTIMATORS[name](threshold, 6, samples, seed=seed, exact_when_affordable=False)
        assert np.all(result.stderr > 0), (seed, result.values, result.stderr)
    # coverage of +-2 SE over many small-sample runs stays high (it fell to 0.24-0.79 with zeros)
    hits = [
        np.abs(r.values - truth) <= 2 * r.stderr
        for r in (ESTIMATORS[name](threshold, 6, 6, seed=s, exact_when_affordable=False) for s in range(200))
    ]
    assert np.mean(hits) >= 0.85


def test_variance_floor_is_zero_only_when_every_marginal_is_the_same():
    from copra.analysis.shapley import variance_floor

    same = np.full((3, 2), 0.5)
    assert variance_floor(same, 3, gap=0.0) == 0.0
    q = 1 / 5
    assert variance_floor(same, 3, gap=0.5) == pytest.approx(q * (1 - q) * 0.25)  # efficiency missed
    zero_one = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # constant per player, varying across players
    assert variance_floor(zero_one, 3, gap=0.0) == pytest.approx(q * (1 - q))


# -- the Game wrapper ----------------------------------------------------------------------------
def counting(value):
    calls = []

    def counted(mask):
        calls.append(tuple(mask))
        return value(mask)

    return counted, calls


@pytest.mark.parametrize("name", ["exact", "permutation", "multilinear"])
def test_no_coalition_is_evaluated_twice(name):
    counted, calls = counting(interacting)
    kwargs = {} if name == "exact" else {"samples": 300}
    result = ESTIMATORS[name](counted, 6, **kwargs)
    assert len(calls) == len(set(calls)) == result.evaluations
    if name == "exact":
        assert len(calls) == 2**6


def test_a_shared_game_keeps_its_cache_across_estimators():
    counted, calls = counting(interacting)
    game = Game(counted, n=6)
    exact(game, 6)
    permutation(game, 6, 100)
    multilinear(game, 6, 100)
    assert len(calls) == 2**6 == game.evaluations
    assert game(tuple([True] * 6)) == interacting([True] * 6) and len(calls) == 2**6


@pytest.mark.parametrize("name", ["exact", "permutation", "multilinear"])
def test_batched_values_match_scalar(name):
    batches = []

    def values(masks):
        assert masks.dtype == bool and masks.shape[1] == 6
        rows = [tuple(r) for r in masks.tolist()]
        assert len(rows) == len(set(rows))  # deduped within the batch
        batches.append(rows)
        return np.array([interacting(r) for r in rows])

    kwargs = {} if name == "exact" else {"samples": 120, "seed": 4, "exact_when_affordable": False}
    scalar = ESTIMATORS[name](interacting, 6, **kwargs)
    batch = ESTIMATORS[name](None, 6, values=values, **kwargs)
    np.testing.assert_allclose(batch.values, scalar.values, atol=1e-12)
    np.testing.assert_allclose(batch.stderr, scalar.stderr, atol=1e-12)
    seen = [r for rows in batches for r in rows]
    assert len(seen) == len(set(seen)) == batch.evaluations  # nothing sent twice across batches
    assert len(batches) <= 3  # one per round, plus at most one for v(empty) / v(all)


def test_nan_and_inf_values_are_refused_naming_the_coalition():
    def value(mask):
        return float("nan") if mask == (True, False, True) else 1.0

    with pytest.raises(UserError, match=r"nan .*\[0, 2\]"):
        exact(value, 3)
    with pytest.raises(UserError, match="inf"):
        permutation(None, 3, 5, values=lambda m: np.where(m.sum(1) == 3, np.inf, 0.0))


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="samples"):
        permutation(additive, 5, 0)
    with pytest.raises(UserError, match="samples"):
        multilinear(additive, 5, 3)  # antithetic needs two pairs
    with pytest.raises(UserError, match="q_points"):
        multilinear(additive, 5, 20, q_points=6)  # 10 pairs -> at most 5 strata
    with pytest.raises(UserError, match="value function"):
        exact(None, 3)
    with pytest.raises(UserError, match="returned 1 values for"):
        exact(None, 2, values=lambda masks: np.zeros(1))
    with pytest.raises(UserError, match="players"):
        exact(Game(additive, n=5), 4)


def test_result_to_dict_is_json_ready():
    result = permutation(additive, len(W), 10)
    data = result.to_dict()
    assert json.loads(json.dumps(data))["values"] == pytest.approx(W.tolist())
    assert set(data) >= {"values", "stderr", "v_empty", "v_full", "evaluations", "method"}
    assert isinstance(result, ShapleyResult) and set(ESTIMATORS) == {"exact", "permutation", "multilinear"}
