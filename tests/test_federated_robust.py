"""Reply checks and robust aggregation (copra.federated.robust): hand-computed arrays, and fuzzed replies."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from copra.federated import robust
from copra.federated.robust import Policy, aggregate, check_reply, norm_outliers, screen
from copra.utils.errors import UserError

A, B = "m.lora_A.weight", "m.lora_B.weight"


def adapter(a, b) -> dict[str, torch.Tensor]:
    return {A: torch.tensor(a, dtype=torch.float32), B: torch.tensor(b, dtype=torch.float32)}


REFERENCE = adapter([[0.0, 0.0, 0.0]], [[0.0], [0.0]])  # rank 1: A [1, 3], B [2, 1]


def test_fusion_is_the_weighted_mean_of_each_factor():
    merged = aggregate([adapter([[1, 2, 3]], [[1], [0]]), adapter([[3, 2, 1]], [[0], [1]])], [0.25, 0.75])
    torch.testing.assert_close(merged[A], torch.tensor([[2.5, 2.0, 1.5]]))
    torch.testing.assert_close(merged[B], torch.tensor([[0.25], [0.75]]))


def test_median_is_per_coordinate_and_ignores_one_wild_reply():
    states = [
        adapter([[1, 2, 3]], [[1], [5]]),
        adapter([[3, -1, 0]], [[2], [4]]),
        adapter([[100, 0, -50]], [[1e6], [0]]),
    ]
    merged = aggregate(states, [0.8, 0.1, 0.1], "median")  # weights are ignored, as Flower's FedMedian does
    torch.testing.assert_close(merged[A], torch.tensor([[3.0, 0.0, 0.0]]))
    torch.testing.assert_close(merged[B], torch.tensor([[2.0], [4.0]]))
    assert merged[A].dtype == torch.float32


def test_trimmed_mean_cuts_num_malicious_values_at_each_end():
    values = [1.0, 2.0, 3.0, 4.0, 100.0]
    states = [adapter([[v, -v, 0]], [[v], [1]]) for v in values]
    merged = aggregate(states, [0.2] * 5, "trimmed_mean", num_malicious=1)
    torch.testing.assert_close(merged[A], torch.tensor([[3.0, -3.0, 0.0]]))  # mean of 2, 3, 4
    two = aggregate(states, [0.2] * 5, "trimmed_mean", num_malicious=2)
    torch.testing.assert_close(two[A], torch.tensor([[3.0, -3.0, 0.0]]))  # the median: 3
    # more than the replies allow: at least one value per coordinate is kept (here the median)
    torch.testing.assert_close(
        aggregate(states[:3], [1 / 3] * 3, "trimmed_mean", num_malicious=5)[A][0, 0], torch.tensor(2.0)
    )
    torch.testing.assert_close(
        aggregate(states, [0.2] * 5, "trimmed_mean", num_malicious=0)[A][0, 0], torch.tensor(22.0)
    )


def test_krum_picks_the_reply_closest_to_its_neighbours():
    # offsets 0, 1, 1.5, 3, 50 on one coordinate; n=5, f=1: each reply's score sums its 2 smallest squared
    # distances: 3.25, 1.25, 2.5, 6.25, huge -> the reply at 1 wins, returned as it is
    states = [adapter([[x, 1, 2]], [[3], [4]]) for x in (0.0, 1.0, 1.5, 3.0, 50.0)]
    merged = aggregate(states, [0.2] * 5, "krum", num_malicious=1)
    assert all(torch.equal(merged[k], states[1][k]) for k in (A, B))


def test_clip_norm_scales_each_update_down_before_merging():
    start = adapter([[1, 1, 1]], [[0], [0]])
    big = adapter([[1 + 3, 1 + 4, 1]], [[0], [0]])  # update norm 5
    small = adapter([[1.3, 1, 1]], [[0], [0]])  # update norm 0.3: unchanged
    merged = aggregate([big, small], [0.5, 0.5], "fusion", clip_norm=1.0, start=start)
    torch.testing.assert_close(merged[A], torch.tensor([[1 + (0.6 + 0.3) / 2, 1 + 0.8 / 2, 1.0]]))
    no_start = robust.clip_update(adapter([[3, 0, 0]], [[0], [4]]), None, 1.0)
    torch.testing.assert_close(no_start[A], torch.tensor([[0.6, 0.0, 0.0]]))
    torch.testing.assert_close(no_start[B], torch.tensor([[0.0], [0.8]]))


def test_update_norm_and_outliers_against_the_lower_median():
    assert robust.update_norm(adapter([[3, 0, 0]], [[0], [4]])) == 5.0
    assert robust.update_norm(adapter([[3, 0, 0]], [[0], [4]]), adapter([[3, 0, 0]], [[0], [1]])) == 3.0
    reasons = norm_outliers([1.0, 1.2, 100.0], 10)
    assert reasons[:2] == [None, None] and "off the round's median 1.2 by more than x10" in reasons[2]
    low = norm_outliers([1.0, 100.0], 10)  # two replies: the smaller norm is the reference
    assert low[0] is None and low[1] is not None
    tiny = norm_outliers([0.001, 1.0, 1.1], 10)
    assert tiny[0] is not None and tiny[1:] == [None, None]
    assert norm_outliers([1.0, 1e9], 0) == [None, None]  # 0: off


@pytest.mark.parametrize(
    "reply, reason",
    [
        (adapter([[0, 0, 0]], [[0], [0]]), None),
        ([1, 2], "not a mapping of tensors but list"),
        ({A: REFERENCE[A]}, "1 key(s) missing, first 'm.lora_B.weight'"),
        (REFERENCE | {"x.lora_A.weight": REFERENCE[A]}, "1 unexpected key(s), first 'x.lora_A.weight'"),
        (REFERENCE | {A: [[0.0, 0.0, 0.0]]}, "m.lora_A.weight: not a tensor but list"),
        (REFERENCE | {A: REFERENCE[A].double()}, "m.lora_A.weight: dtype float64, expected float32"),
        (REFERENCE | {A: torch.zeros(2, 3)}, "m.lora_A.weight: rank 2, expected 1"),
        (REFERENCE | {B: torch.zeros(3, 1)}, "m.lora_B.weight: shape [3, 1], expected [2, 1]"),
        (REFERENCE | {B: torch.tensor([[float("nan")], [float("inf")]])}, "m.lora_B.weight: 2 value(s) NaN or inf"),
    ],
)
def test_check_reply_names_what_is_wrong(reply, reason):
    assert check_reply(REFERENCE, reply) == reason


def test_check_reply_compares_the_lora_settings():
    want = {"rank": 1, "lora-alpha": 1.0}
    assert check_reply(REFERENCE, REFERENCE, {"rank": 1, "lora-alpha": 1.0}, want) is None
    assert check_reply(REFERENCE, REFERENCE, {"rank": 1, "lora-alpha": 8.0}, want) == (
        "LoRA setting lora-alpha = 8.0, expected 1.0"
    )
    assert check_reply(REFERENCE, REFERENCE, None, want) == "LoRA setting rank = None, expected 1"


def test_screen_rejects_a_nan_and_a_x100_reply_and_keeps_the_honest_ones():
    g = torch.Generator().manual_seed(0)
    honest = [{k: v + torch.randn(v.shape, generator=g) for k, v in REFERENCE.items()} for _ in range(3)]
    replies = [honest[0], robust.apply_fault(honest[1], "nan"), honest[2], robust.apply_fault(honest[0], "scale100")]
    reasons = screen(REFERENCE, replies, Policy())
    assert reasons[0] is None and reasons[2] is None
    assert "NaN or inf" in reasons[1] and "by more than x10" in reasons[3]
    assert screen(REFERENCE, replies, Policy(norm_factor=0))[3] is None  # the norm test off: only the structure


def test_faults_and_policy_values():
    state = adapter([[1, 2, 3]], [[1], [2]])
    assert torch.equal(robust.apply_fault(state, "scale100")[B], torch.tensor([[100.0], [200.0]]))
    nan = robust.apply_fault(state, "nan")
    assert math.isnan(nan[A][0, 0]) and torch.isfinite(state[A]).all()  # the input is not changed
    assert robust.apply_fault(state, None) is state
    for bad in (
        dict(aggregate="mean"),
        dict(clip_norm=-1.0),
        dict(clip_norm=float("nan")),
        dict(norm_factor=1.0),
        dict(norm_factor=-2),
        dict(num_malicious=-1),
        dict(num_malicious=1.5),
    ):
        with pytest.raises(UserError):
            Policy(**bad)
    with pytest.raises(UserError, match="unknown fault"):
        robust.apply_fault(state, "flip")


# --- fuzzed replies: every malformed one yields a reason, none raises -------------------------------------

_DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool, torch.complex64]
_garbage = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5) | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def malformed(draw):
    """A reply with one thing wrong: a key dropped or added, a wrong shape or dtype, a NaN/inf, or garbage."""
    reply = {k: v.clone() + draw(st.floats(-1, 1)) for k, v in REFERENCE.items()}
    key = draw(st.sampled_from(sorted(reply)))
    kind = draw(st.sampled_from(["drop", "add", "shape", "dtype", "nonfinite", "value", "garbage"]))
    if kind == "drop":
        del reply[key]
    elif kind == "add":
        reply[draw(st.text(max_size=10).filter(lambda k: k not in reply)) or "extra"] = reply[key]
    elif kind == "shape":
        shape = draw(
            st.lists(st.integers(0, 4), min_size=0, max_size=3).filter(lambda s: s != list(REFERENCE[key].shape))
        )
        reply[key] = torch.zeros(shape)
    elif kind == "dtype":
        reply[key] = reply[key].to(draw(st.sampled_from(_DTYPES)))
    elif kind == "nonfinite":
        flat = reply[key].view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")])
        )
    elif kind == "value":
        reply[key] = draw(_garbage)
    else:
        return draw(_garbage)
    return reply


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed())
def test_every_malformed_reply_gets_a_reason_and_nothing_raises(reply):
    reason = check_reply(REFERENCE, reply)
    assert isinstance(reason, str) and reason


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=5, max_size=5), st.floats(1e6, 1e30))
def test_a_huge_finite_reply_is_rejected_by_its_norm_and_honest_ones_pass(values, huge):
    honest = [{k: v + x for k, v in REFERENCE.items()} for x in (1.0, 1.1, 1.2)]
    start = {k: v + values[0] for k, v in REFERENCE.items()}
    honest = [{k: start[k] + v for k, v in h.items()} for h in honest]
    wild = {k: start[k] + huge for k in REFERENCE}
    reasons = screen(REFERENCE, [*honest, wild], Policy(), start=start)
    assert reasons[:3] == [None, None, None] and "by more than x10" in reasons[3]
