"""`copra federated` with bad clients and a killed server: replies screened, robust aggregation, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_federated import fed_config

import copra.experiments.federated as fed_module
from copra.adapters.io import load_adapter
from copra.adapters.merge import fusion
from copra.cli import main
from copra.experiments.federated import run, simulate
from copra.models.evaluation import prepare_data
from copra.utils.errors import UserError


def test_a_nan_and_a_x100_client_are_rejected_recorded_and_not_merged(tiny_text_model, tmp_path):
    config = fed_config(
        tiny_text_model, tmp_path, clients=3, rounds=2, methods=["copra"], faults=["2=nan@1", "2=scale100@2"]
    )
    data = prepare_data(config.data_config(0))
    fed = simulate(config, "copra", 0, data)
    one, two = fed.rounds
    assert one["accepted"] == [0, 1] and two["accepted"] == [0, 1]
    assert [r["client"] for r in one["rejected"]] == [2] and "NaN or inf" in one["rejected"][0]["reason"]
    assert [r["client"] for r in two["rejected"]] == [2] and "by more than x10" in two["rejected"][0]["reason"]
    sizes = fed.client_sizes
    want = fusion(fed.client_states[:2], [sizes[0] / sum(sizes[:2]), sizes[1] / sum(sizes[:2])])
    for key, value in want.items():  # the last round's merge: the two honest replies only
        torch.testing.assert_close(fed.merged_state[key], value)
    assert all(torch.isfinite(v).all() for v in fed.merged_state.values())
    # the x100 reply really was x100 of what client 2 trained, so the fusion of all three is far off
    assert max(float(fed.client_states[2][k].abs().max()) for k in want) > 10 * max(
        float(want[k].abs().max()) for k in want
    )


def test_median_withstands_an_unscreened_x100_client(tiny_text_model, tmp_path):
    config = fed_config(
        tiny_text_model,
        tmp_path,
        clients=4,
        methods=["copra"],
        faults=["3=scale100"],
        aggregate="median",
        norm_factor=0.0,  # no norm test: the median alone has to cope
    )
    fed = simulate(config, "copra", 0, prepare_data(config.data_config(0)))
    assert fed.rounds[0]["accepted"] == [0, 1, 2, 3] and fed.rounds[0]["rejected"] == []
    for key, merged in fed.merged_state.items():  # by hand: per coordinate, the mean of the two middle values
        stacked = np.stack([s[key].double().numpy() for s in fed.client_states])
        middle = np.sort(stacked, axis=0)[1:3].mean(axis=0)
        np.testing.assert_allclose(merged.double().numpy(), middle, rtol=1e-6, atol=1e-7)


def test_too_few_accepted_replies_stop_the_run_with_one_line(tiny_text_model, tmp_path):
    config = fed_config(
        tiny_text_model, tmp_path, clients=2, methods=["copra"], faults=["0=nan", "1=nan"], min_reply_fraction=0.5
    )
    with pytest.raises(UserError, match=r"round 1: 0 of 2 replies accepted, 1 needed"):
        simulate(config, "copra", 0, prepare_data(config.data_config(0)))


def test_a_run_stopped_after_round_2_resumes_to_the_uninterrupted_adapter(tiny_text_model, tmp_path, monkeypatch):
    settings = dict(clients=2, rounds=3, methods=["copra"], aggregate="trimmed_mean")
    whole = run(fed_config(tiny_text_model, tmp_path / "whole", **settings))
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
    out = tmp_path / "killed" / "fed"
    assert (
        json.loads((out / "progress" / "copra-seed0.json").read_text())["adapter"] == "copra-seed0-round2.safetensors"
    )
    assert not (out / "federated.json").exists()
    calls.clear()
    resumed = run(config)
    assert calls == [10_000 * 0 + 100 * 2 + i for i in range(2)]  # only round 3 trained again: client_seed(0, 2, i)
    assert resumed["runs"]["copra"][0]["rounds"] == whole["runs"]["copra"][0]["rounds"]  # no round lost or doubled
    mine, _ = load_adapter(resumed["runs"]["copra"][0]["adapter_dir"])
    theirs, _ = load_adapter(whole["runs"]["copra"][0]["adapter_dir"])
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], atol=1e-6, rtol=0)


def test_a_changed_setting_on_resume_is_refused_before_anything_is_written(tiny_text_model, tmp_path):
    run(fed_config(tiny_text_model, tmp_path, clients=2, methods=["copra"]))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "fed").rglob("*")}
    with pytest.raises(UserError, match=r"holds a federated run with aggregate='fusion', now 'median'"):
        run(fed_config(tiny_text_model, tmp_path, clients=2, methods=["copra"], aggregate="median"))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "fed").rglob("*")} == before


@pytest.mark.parametrize(
    "setting, message",
    [
        ("aggregate=mean", "unknown aggregate 'mean'"),
        ("clip_norm=-1", "clip_norm must be a finite number >= 0"),
        ("norm_factor=0.5", "norm_factor must be 0 (off) or above 1"),
        ("faults=['1=flip']", "unknown fault 'flip'"),
        ("faults=['9=nan']", "outside the run"),
        ("merge_method=ties", "replaces merge_method"),
    ],
)
def test_bad_robust_settings_are_one_line_exit_2_and_write_nothing(
    capsys, tmp_path, tiny_text_model, setting, message
):
    out = tmp_path / "out"
    extra = ["--set", "aggregate=median"] if setting.startswith("merge_method") else []
    code = main(["federated", "-q", "--set", f"model={tiny_text_model}", "--set", setting, *extra, "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("copra: error:") and message in err[0], err
    assert not out.exists()
