"""Federated LoRA/CopRA (paper Sec. 3.1, Table 1 left): split, in-process rounds, outputs, Flower."""

from __future__ import annotations

import json
import os

import pytest
import torch

from copra.experiments.federated import FederatedConfig, client_seed, run, simulate, split_clients
from copra.models.evaluation import FewShotData, adapter_state, prepare_data
from copra.training.loop import build_run, train
from copra.utils.errors import UserError

from conftest import bar_heights, tiny_run_config


def fake_data(n: int = 10) -> FewShotData:
    return FewShotData(
        task="t",
        class_names=("a", "b"),
        prompts=("p a", "p b"),
        train_x=tuple(f"x{i}" for i in range(n)),
        train_y=tuple(i % 2 for i in range(n)),
        eval_x=("e0", "e1"),
        eval_y=(0, 1),
    )


def fed_config(model: str, tmp_path, **overrides) -> FederatedConfig:
    values = dict(
        task="bbc_news",
        model=model,
        clients=3,
        rounds=1,
        seeds=[0],
        methods=["lora", "copra"],
        shots=2,
        steps=4,
        batch_size=4,
        eval_examples=20,
        overrides={"max_length": 16},
        output_dir=str(tmp_path / "fed"),
        progress=False,
    )
    return FederatedConfig(**(values | overrides))


def test_split_clients_is_a_seeded_partition():
    data = fake_data(10)
    parts = split_clients(data, 3, seed=4)
    assert sorted(len(p.train_x) for p in parts) == [3, 3, 4]
    seen = [x for p in parts for x in p.train_x]
    assert sorted(seen) == sorted(data.train_x)  # disjoint and complete
    for p in parts:
        assert all(data.train_y[data.train_x.index(x)] == y for x, y in zip(p.train_x, p.train_y))
        assert (p.eval_x, p.eval_y, p.prompts, p.class_names) == (
            data.eval_x,
            data.eval_y,
            data.prompts,
            data.class_names,
        )
    assert [p.train_x for p in split_clients(data, 3, seed=4)] == [p.train_x for p in parts]
    assert [p.train_x for p in split_clients(data, 3, seed=5)] != [p.train_x for p in parts]
    assert split_clients(data, 1, 0)[0].train_x == data.train_x


@pytest.mark.parametrize("k", [0, -1, 11, 2.5, True])
def test_split_clients_refuses_bad_k(k):
    with pytest.raises(UserError, match="clients"):
        split_clients(fake_data(10), k, 0)


@pytest.mark.parametrize(
    "bad",
    [
        dict(clients=0),
        dict(rounds=0),
        dict(seeds=[]),
        dict(methods=["lora", "lora"]),
        dict(methods=["sgd"]),
        dict(overrides={"seed": 3}),
        dict(lr=-1.0),
    ],
)
def test_federated_config_refuses_bad_values(tiny_text_model, tmp_path, bad):
    with pytest.raises(UserError):
        fed_config(tiny_text_model, tmp_path, **bad)


def test_client_seeds_differ_per_client_round_and_run():
    seeds = {client_seed(s, r, i) for s in range(3) for r in range(5) for i in range(7)}
    assert len(seeds) == 3 * 5 * 7


def test_train_starts_from_initial_state(tiny_text_model):
    config = tiny_run_config(tiny_text_model)
    start = train(config.replace(seed=7)).state
    assert start is not None and set(start) == set(adapter_state(build_run(config)[0]))
    # lr ~ 0: the result is the initial state, not the seed-0 init
    frozen = train(config.replace(lr=1e-12, min_lr=0.0, weight_decay=0.0), initial_state=start).state
    assert all(torch.allclose(frozen[k], start[k], atol=1e-9) for k in start)


def test_one_shot_run_writes_results_and_a_peft_adapter(tiny_text_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    config = fed_config(tiny_text_model, tmp_path)
    summary = run(config)
    out = tmp_path / "fed"
    assert json.loads((out / "federated.json").read_text())["summary"] == summary["summary"]
    assert (out / "federated.png").read_bytes()[:4] == b"\x89PNG"
    assert "| copra |" in (out / "federated.md").read_text()
    for method in ("lora", "copra"):
        (entry,) = summary["runs"][method]
        assert sorted(entry["client_sizes"]) == [3, 3, 4]  # bbc_news: 5 classes x 2 shots over 3 clients
        (round1,) = entry["rounds"]
        assert len(round1["client_accuracy"]) == 3 and 0 <= round1["merged_accuracy"] <= 1
        assert len(round1["client_converged"]) == len(round1["client_final_loss"]) == 3  # each client's plateau test
        assert set(summary["summary"][method]) >= {"client_mean", "client_std", "merged_mean", "merged_std"}
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_text_model), entry["adapter_dir"])
        assert any("lora_A" in name for name, _ in model.named_parameters())


def test_merged_state_is_size_weighted_fusion_and_rounds_continue(tiny_text_model, tmp_path):
    config = fed_config(tiny_text_model, tmp_path, clients=3, rounds=2, methods=["copra"])
    data = prepare_data(config.data_config(0))
    fed = simulate(config, "copra", 0, data)
    assert [r["round"] for r in fed.rounds] == [1, 2] and all(len(r["client_accuracy"]) == 3 for r in fed.rounds)
    sizes = fed.client_sizes
    for key, merged in fed.merged_state.items():  # by hand: sum_i n_i/N * state_i
        expected = sum(n / sum(sizes) * s[key].double() for n, s in zip(sizes, fed.client_states))
        torch.testing.assert_close(merged.double(), expected, atol=1e-7, rtol=1e-6)
    one_round = simulate(fed_config(tiny_text_model, tmp_path, clients=3, rounds=1), "copra", 0, data)
    # round 2 started from round 1's merge, so it ends elsewhere than round 1
    assert any(not torch.equal(fed.merged_state[k], one_round.merged_state[k]) for k in fed.merged_state)
    lora_b = [k for k in fed.merged_state if "lora_B" in k]
    assert any(fed.merged_state[k].abs().sum() > 0 for k in lora_b)


def test_peft_merge_method_aggregates_in_the_clients_scaling(tiny_text_model, tmp_path):
    from copra.adapters.merge import delta_weights
    from copra.adapters.peft_merge import peft_merge

    config = fed_config(
        tiny_text_model, tmp_path, clients=2, methods=["copra"], merge_method="dare_ties", merge_density=0.8
    )
    data = prepare_data(config.data_config(0))
    fed = simulate(config, "copra", 0, data)
    classifier, _ = build_run(config.client_config("copra", 0, 0, 0), data)
    client = {
        k: (sorted(v) if isinstance(v, set) else v)
        for k, v in classifier.encoder.peft_config["default"].to_dict().items()
    }
    want, _ = peft_merge(fed.client_states, [client] * 2, "dare_ties", [0.5, 0.5], density=0.8)
    got, peft = delta_weights(fed.merged_state), delta_weights(want)  # same update: B rescaled by 1 / s_client
    s = client["lora_alpha"] / client["r"] ** 0.5
    for key in got:
        torch.testing.assert_close(s * got[key], peft[key], rtol=1e-5, atol=1e-7)
    with pytest.raises(UserError, match="changes the rank"):
        fed_config(tiny_text_model, tmp_path, merge_method="cat")
    with pytest.raises(UserError, match="unknown merge method"):
        fed_config(tiny_text_model, tmp_path, merge_method="average")


def test_two_round_run_plots_merged_accuracy_by_round(tiny_text_model, tmp_path):
    from copra.experiments.federated import draw

    summary = run(fed_config(tiny_text_model, tmp_path, clients=2, rounds=2, shared_init=True))
    for method in ("lora", "copra"):
        assert len(summary["summary"][method]["merged_by_round"]) == 2
    saved = json.loads((tmp_path / "fed" / "federated.json").read_text())["summary"]
    bars, by_round = draw(summary).axes  # the PNG's figure
    assert bar_heights(bars) == [
        [pytest.approx(100 * saved[m][f"{kind}_mean"]) for m in ("lora", "copra")] for kind in ("client", "merged")
    ]
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in by_round.lines] == [
        ([1, 2], [pytest.approx(100 * a) for a in saved[m]["merged_by_round"]]) for m in ("lora", "copra")
    ]
    assert "Merged accuracy by round" in (tmp_path / "fed" / "federated.md").read_text()


@pytest.mark.slow
def test_flower_simulation_matches_in_process_fusion(tiny_text_model, tmp_path):
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    from copra.federated.simulation import run_flower_simulation

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    config = fed_config(tiny_text_model, tmp_path, clients=2, rounds=1, methods=["copra"])
    data = prepare_data(config.data_config(0))
    flower = run_flower_simulation(config, data=data)
    local = simulate(config, "copra", 0, data)
    assert [r["clients"] for r in flower["rounds"]] == [[0, 1]]
    assert flower["rounds"][0]["client_sizes"] == local.client_sizes
    for mine, theirs in zip(local.client_states, flower["client_states"]):  # same seeds -> same client training
        assert all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in mine)
    assert set(flower["merged_state"]) == set(local.merged_state)
    for key, merged in local.merged_state.items():
        torch.testing.assert_close(flower["merged_state"][key], merged, atol=1e-6, rtol=0)
    assert flower["rounds"][0]["merged_accuracy"] == pytest.approx(local.rounds[0]["merged_accuracy"])
