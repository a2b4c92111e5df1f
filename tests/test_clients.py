"""Clients' shares for one-shot FL merges: IID round-robin and Dirichlet label skew."""

import pytest

from copra.experiments.runner.clients import dirichlet_shares, iid_shares, shares_of
from copra.utils.errors import UserError

LABELS = tuple(c for c in range(8) for _ in range(10))  # 8 classes x 10 examples


def test_iid_shares_deal_every_class_round_robin():
    labels = (0, 0, 0, 1, 1, 1, 2, 2)
    shares = iid_shares(labels, 3, seed=4)
    assert sorted(i for s in shares for i in s) == list(range(8))
    assert all(2 <= len(s) <= 3 for s in shares)
    assert shares == iid_shares(labels, 3, seed=4) != iid_shares(labels, 3, seed=5)


def classes_per_client(shares):
    return sum(len({LABELS[i] for i in s}) for s in shares) / len(shares)


def test_dirichlet_shares_partition_the_sample_and_skew_it_by_alpha():
    for alpha in (0.1, 1.0, 100.0):
        shares = dirichlet_shares(LABELS, 5, alpha, seed=0)
        assert sorted(i for s in shares for i in s) == list(range(len(LABELS)))
        assert all(shares) and shares == dirichlet_shares(LABELS, 5, alpha, seed=0)
    skewed = sum(classes_per_client(dirichlet_shares(LABELS, 5, 0.1, seed=s)) for s in range(5)) / 5
    mild = sum(classes_per_client(dirichlet_shares(LABELS, 5, 100.0, seed=s)) for s in range(5)) / 5
    assert skewed < 4.5 < 7.5 < mild  # alpha 0.1: a few classes per client; alpha 100: nearly all 8


def test_no_client_is_left_empty_and_bad_partitions_are_one_line_errors():
    assert all(dirichlet_shares((0, 0, 1, 1, 2), 5, 0.01, seed=3))
    assert shares_of("dirichlet_0.5", LABELS, 4, 1) == dirichlet_shares(LABELS, 4, 0.5, 1)
    for bad in ("dirichlet_x", "dirichlet_-1", "skewed"):
        with pytest.raises(UserError, match="unknown client partition"):
            shares_of(bad, LABELS, 4, 1)
    with pytest.raises(UserError, match="cannot be shared by 5 clients"):
        dirichlet_shares((0, 1), 5, 1.0, seed=0)
