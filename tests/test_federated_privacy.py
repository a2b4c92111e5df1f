"""Differential privacy of the merge (DP-FedAvg, server-side fixed clipping): the math on constructed adapters,
the noise's scale and seed, the settings' contract, and a DP run that resumes to the uninterrupted adapter."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from test_federated import fed_config  # noqa: E402

import copra.experiments.federated as fed_module  # noqa: E402
from copra.adapters.io import load_adapter  # noqa: E402
from copra.adapters.merge import fusion  # noqa: E402
from copra.cli import main  # noqa: E402
from copra.experiments.federated import run  # noqa: E402
from copra.federated.privacy import GaussianNoise, dp_merge  # noqa: E402
from copra.federated.robust import Policy  # noqa: E402
from copra.utils.compat import flower_fixed_clipping  # noqa: E402
from copra.utils.errors import UserError  # noqa: E402

A, B = "m.lora_A.weight", "m.lora_B.weight"
DP = {"dp_noise_multiplier": 0.5, "dp_clip_norm": 1.0, "norm_factor": 0.0}


def adapter(a, b) -> dict[str, torch.Tensor]:
    return {A: torch.tensor(a), B: torch.tensor(b)}


def random_adapter(seed: int, scale: float = 1.0, start=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = {A: scale * torch.randn(32, 256, generator=g), B: scale * torch.randn(256, 32, generator=g)}
    return s if start is None else {k: start[k] + v for k, v in s.items()}


def test_each_update_is_clipped_over_a_and_b_together_then_averaged_unweighted():
    start = adapter([[1.0, 1.0]], [[0.0], [0.0]])
    far = adapter([[4.0, 1.0]], [[0.0], [4.0]])  # update (3, 0 | 0, 4): norm 5 over both factors
    near = adapter([[1.6, 1.0]], [[0.0], [0.8]])  # update (0.6, 0 | 0, 0.8): norm 1, under the clip
    merged, record = dp_merge([far, near], start, 2.5, 0.0, GaussianNoise(0))
    # far's update halved to norm 2.5: (1.5, 0 | 0, 2); mean with near's: (1.05, 0 | 0, 1.4); plus the start
    torch.testing.assert_close(merged[A], torch.tensor([[2.05, 1.0]]))
    torch.testing.assert_close(merged[B], torch.tensor([[0.0], [1.4]]))
    assert record == {"clip_norm": 2.5, "noise_multiplier": 0.0, "noise_std": 0.0, "replies": 2, "clipped": 1}


def test_flowers_clipping_leaves_each_update_at_most_the_clip_norm_in_its_direction():
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(4, 8)), rng.normal(size=(8, 4))]
    long = [s + 10 * rng.normal(size=s.shape) for s in start]
    short = [s + 1e-3 * rng.normal(size=s.shape) for s in start]

    def norm(arrays):
        return math.sqrt(sum(float(((x - s) ** 2).sum()) for x, s in zip(arrays, start)))

    (c_long, c_short, c_zero), std = flower_fixed_clipping([long, short, start], start, 1.5, 2.0)
    assert norm(c_long) == pytest.approx(1.5, rel=1e-12)
    for clipped, original, s in zip(c_long, long, start):
        np.testing.assert_allclose((clipped - s) * norm(long) / 1.5, original - s, rtol=1e-12)
    for clipped, original in zip(c_short, short):
        np.testing.assert_allclose(clipped, original, rtol=0, atol=1e-14)
    assert all(np.array_equal(c, s) for c, s in zip(c_zero, start))  # a zero update: no division by its norm
    assert std == 2.0 * 1.5 / 3


def test_the_noise_std_is_z_times_clip_over_the_replies_over_many_draws():
    start = random_adapter(0)
    states = [random_adapter(i, 1e-3, start) for i in range(1, 5)]  # update norms ~0.13: under the clip
    clean, _ = dp_merge(states, start, 0.8, 0.0, GaussianNoise(0))
    noise, draws = GaussianNoise(7), []
    for _ in range(3):  # three rounds from one generator
        noised, record = dp_merge(states, start, 0.8, 1.3, noise)
        draws.append(torch.cat([(noised[k] - clean[k]).double().flatten() for k in clean]))
    want = 1.3 * 0.8 / 4  # noise_multiplier * clip_norm / replies, by hand: 0.26
    assert record["noise_std"] == pytest.approx(want) and record["clipped"] == 0
    pooled = torch.cat(draws)  # 3 x 16384 draws: the sample std is within 1% of the truth at 3 sigma
    assert float(pooled.std()) == pytest.approx(want, rel=0.02)
    assert abs(float(pooled.mean())) < 5 * want / math.sqrt(len(pooled))
    assert not torch.equal(draws[0], draws[1])  # every round draws fresh noise


def test_no_noise_and_a_huge_clip_give_plain_fusion():
    states = [random_adapter(i) for i in range(3)]
    want = fusion(states, [1 / 3] * 3)  # fusion's n_i / N when the clients' sizes are equal
    merged, record = dp_merge(states, None, 1e12, 0.0, GaussianNoise(0))
    assert all(torch.equal(merged[k], want[k]) for k in want) and record["clipped"] == 0
    merged, _ = dp_merge(states, random_adapter(9), 1e12, 0.0, GaussianNoise(0))
    for key, value in want.items():  # start + (theta - start): float rounding only
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-5)


def test_the_noise_is_seeded_and_its_state_resumes_through_json():
    whole = GaussianNoise(3)
    first, second = whole.normal(1.0, (5,)), whole.normal(1.0, (5,))
    stopped = GaussianNoise(3)
    np.testing.assert_array_equal(stopped.normal(1.0, (5,)), first)
    resumed = GaussianNoise(3, json.loads(json.dumps(stopped.state())))
    np.testing.assert_array_equal(resumed.normal(1.0, (5,)), second)
    assert not np.array_equal(GaussianNoise(4).normal(1.0, (5,)), first)
    assert not np.array_equal(GaussianNoise(3).normal(1.0, (5,)), second)  # a fresh generator would repeat round 1
    with pytest.raises(UserError, match="cannot resume the DP noise"):
        GaussianNoise(3, {"bit_generator": "PCG64"})


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(dp_noise_multiplier=-1.0), "dp_noise_multiplier must be a finite number >= 0"),
        (dict(dp_noise_multiplier=float("inf")), "dp_noise_multiplier must be a finite number >= 0"),
        (dict(dp_clip_norm=-0.5), "dp_clip_norm must be a finite number >= 0"),
        (dict(dp_noise_multiplier=1.0, norm_factor=0.0), "dp_noise_multiplier needs dp_clip_norm > 0"),
        (dict(dp_clip_norm=1.0), "dp_clip_norm is set but dp_noise_multiplier is 0"),
        (DP | {"aggregate": "median"}, "aggregate must be fusion, not 'median'"),
        (DP | {"clip_norm": 2.0}, "dp_clip_norm already clips every update; set clip_norm to 0"),
        (DP | {"norm_factor": 10.0}, "with differential privacy set norm_factor=0"),
    ],
)
def test_dp_settings_that_do_not_compose_are_refused(bad, message):
    with pytest.raises(UserError, match=re.escape(message)):
        Policy(**bad)


def test_dp_is_on_with_noise_only():
    assert Policy(**DP).dp and not Policy().dp


@pytest.mark.parametrize(
    "sets, message",
    [
        (["dp_noise_multiplier=-1"], "dp_noise_multiplier must be a finite number >= 0"),
        (["dp_noise_multiplier=1", "norm_factor=0"], "needs dp_clip_norm > 0"),
        (["dp_clip_norm=0.5"], "dp_noise_multiplier is 0"),
        (["dp_noise_multiplier=1", "dp_clip_norm=1"], "set norm_factor=0"),
        (
            ["dp_noise_multiplier=1", "dp_clip_norm=1", "norm_factor=0", "merge_method=ties"],
            "merge_method must be fusion",
        ),
    ],
)
def test_bad_dp_settings_are_one_line_exit_2_and_write_nothing(capsys, tmp_path, tiny_text_model, sets, message):
    out = tmp_path / "out"
    extra = [arg for s in sets for arg in ("--set", s)]
    code = main(["federated", "-q", "--set", f"model={tiny_text_model}", *extra, "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("copra: error:") and message in err[0], err
    assert not out.exists()


def test_a_dp_run_stopped_after_round_2_resumes_to_the_uninterrupted_adapter(tiny_text_model, tmp_path, monkeypatch):
    settings = dict(clients=2, rounds=3, methods=["copra"], **DP)
    whole = run(fed_config(tiny_text_model, tmp_path / "whole", **settings))
    rounds = whole["runs"]["copra"][0]["rounds"]
    assert whole["config"]["dp_noise_multiplier"] == 0.5 and whole["config"]["dp_clip_norm"] == 1.0
    assert "Differentially private merge" in (tmp_path / "whole" / "fed" / "federated.md").read_text()
    assert [r["dp"]["noise_std"] for r in rounds] == [0.5 * 1.0 / 2] * 3 and all(
        r["dp"]["replies"] == 2 for r in rounds
    )
    config = fed_config(tiny_text_model, tmp_path / "killed", **settings)
    real_train, calls = fed_module.train, []

    def dies_in_round_3(config, **kwargs):
        calls.append(config.seed)
        if len(calls) == 5:  # 2 clients x 2 rounds done: the server dies in round 3
            raise KeyboardInterrupt
        return real_train(config, **kwargs)

    monkeypatch.setattr(fed_module, "train", dies_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    saved = json.loads((tmp_path / "killed" / "fed" / "progress" / "copra-seed0.json").read_text())
    assert len(saved["rounds"]) == 2 and saved["noise_rng"]["bit_generator"] == "PCG64"
    calls.clear()
    resumed = run(config)
    assert calls == [200, 201]  # only round 3 trained again
    assert resumed["runs"]["copra"][0]["rounds"] == rounds
    mine, _ = load_adapter(resumed["runs"]["copra"][0]["adapter_dir"])
    theirs, _ = load_adapter(whole["runs"]["copra"][0]["adapter_dir"])
    for key in theirs:  # round 3's noise drawn on from round 2's state, not again from the seed
        torch.testing.assert_close(mine[key], theirs[key], atol=1e-6, rtol=0)
