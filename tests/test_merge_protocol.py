"""The pre-registered merge protocol (issue 23) on the tiny encoder: endpoints, statistics, pre-registration."""

import json
from pathlib import Path

import pytest
import torch

from copra.adapters.io import load_adapter
from copra.adapters.merge import fusion, scale_update
from copra.analysis.protocol import holm
from copra.data.fewshot import prepare_data, prepare_shared_validation
from copra.experiments import merge_protocol
from copra.experiments.runner.common import Evaluator
from copra.utils.errors import UserError

FAST = dict(shots=2, steps=4, batch_size=4, eval_examples=20, overrides={"max_length": 16}, progress=False)


def small_config(model, out, **change):
    values = dict(
        model=model,
        tasks=["bbc_news", "drug_reviews"],
        seeds=[0, 1, 2, 3],
        clients=2,
        mtl_scales=[1.0, 3.0],
        validation_examples=20,
        resamples=200,
        lr=0.05,
        output_dir=str(out),
        **FAST,
    )
    return merge_protocol.MergeProtocolConfig(**(values | change))


@pytest.fixture(scope="module")
def protocol(tiny_text_model, tmp_path_factory):
    config = small_config(tiny_text_model, tmp_path_factory.mktemp("protocol"))
    return config, merge_protocol.run(config)


def test_every_endpoint_has_its_rows_and_a_holm_adjusted_verdict(protocol):
    config, summary = protocol
    endpoints = summary["analysis"]["endpoints"]
    assert list(endpoints) == list(merge_protocol.ENDPOINTS)
    assert [len(summary["rows"]["seed_fusion"][t]["copra"]) for t in config.tasks] == [2, 2]  # disjoint pairs
    assert len(summary["rows"]["prune_every_other"]["bbc_news"]["lora"]) == 4
    assert endpoints["seed_fusion"]["rows"] == 4 and endpoints["fl_one_shot"]["rows"] == 8
    assert [e["p_holm"] for e in endpoints.values()] == pytest.approx(holm([e["p"] for e in endpoints.values()]))
    for e in endpoints.values():
        assert e["verdict"] in ("held", "reversed", "no difference shown")
        if e["p_holm"] >= config.alpha:
            assert e["verdict"] == "no difference shown"
    task = endpoints["seed_fusion"]["tasks"]["bbc_news"]
    assert task["boot_low"] <= task["difference"] + 1e-9 and task["difference"] <= task["boot_high"] + 1e-9
    text = (Path(config.output_dir) / "merge_protocol.md").read_text()
    assert "| **seed_fusion** | pooled |" in text and summary["preregistration"]["sha256"][:16] in text


def test_fl_is_the_fusion_of_clients_trained_on_their_shares(protocol, tiny_text_model):
    config, summary = protocol
    out = Path(config.output_dir)
    folders = [out / "runs/bbc_news/copra/seed2" / f"client{k}of2" for k in range(2)]
    clients = [load_adapter(f / "adapter") for f in folders]
    data = prepare_data(config.run_config("bbc_news", "copra", 2))
    result = json.loads((folders[0] / "result.json").read_text())
    assert result["config"]["steps"] == 2  # steps / clients
    ev = Evaluator(config.run_config("bbc_news", "lora", 0))
    merged = ev.scored(fusion([c[0] for c in clients], [0.5, 0.5]), clients[0][1], data)
    assert summary["rows"]["fl_one_shot"]["bbc_news"]["copra"][2]["accuracy"] == pytest.approx(merged.accuracy)


def test_mtl_picks_lambda_on_validation_and_reports_retention(protocol):
    config, summary = protocol
    out = Path(config.output_dir)
    row = summary["rows"]["mtl_retention"]["all"]["lora"][1]
    states = [load_adapter(out / f"runs/{t}/lora/seed1/adapter") for t in config.tasks]
    merged = fusion([s for s, _ in states], [0.5, 0.5])
    validation = {
        t: prepare_shared_validation([config.run_config(t, "lora", s) for s in config.seeds], 20) for t in config.tasks
    }
    evs = {t: Evaluator(config.run_config(t, "lora", 0)) for t in config.tasks}
    score = {
        lam: sum(evs[t].scored(scale_update(merged, lam), states[0][1], validation[t]).accuracy for t in config.tasks)
        for lam in config.mtl_scales
    }
    assert row["scale"] == max(config.mtl_scales, key=lambda lam: score[lam])
    own = summary["rows"]["single"]["drug_reviews"]["lora"][1]["accuracy"]
    test = prepare_data(config.run_config("drug_reviews", "lora", 0))
    merged_acc = evs["drug_reviews"].scored(scale_update(merged, row["scale"]), states[0][1], test).accuracy
    assert row["per_task"]["drug_reviews"] == pytest.approx(merged_acc / own)


def test_a_rerun_reuses_everything_and_a_changed_registration_is_refused(protocol, tiny_text_model):
    config, summary = protocol
    out = Path(config.output_dir)
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}
    again = merge_protocol.run(config)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")} == before
    assert again["analysis"] == summary["analysis"]
    registered = (out / "preregistration.json").read_text()
    changed = small_config(tiny_text_model, out, endpoints=["prune_every_other", "seed_fusion"])
    with pytest.raises(UserError, match="refused"):
        merge_protocol.run(changed)
    assert (out / "preregistration.json").read_text() == registered


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(seeds=[0, 1, 2, 3, 4]), "even number"),
        (dict(tasks=["bbc_news"]), "tasks"),
        (dict(endpoints=["nope"]), "nope"),
        (dict(clients=1), "clients"),
        (dict(mtl_scales=[0.0]), "positive"),
        (dict(cell={"seed": 3}), "seed"),
    ],
)
def test_bad_settings_are_one_line_errors_and_write_nothing(tiny_text_model, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        small_config(tiny_text_model, tmp_path / "out", **change)
    assert not (tmp_path / "out").exists()


def test_control_arms_are_exploratory_comparisons_beside_the_primary_ones(tiny_text_model, tmp_path):
    controls = {"LoRA, half the steps": {"method": "lora", "steps_scale": 0.5}}
    config = small_config(tiny_text_model, tmp_path, endpoints=["seed_fusion"], controls=controls)
    run = config.run_config("bbc_news", "LoRA, half the steps", 1)
    assert run.method == "lora" and run.steps == 2 and run.seed == 1
    summary = merge_protocol.run(config)
    assert list(summary["analysis"]["endpoints"]) == ["seed_fusion"]  # the controls never enter Holm
    asked = {(x["endpoint"], x["treatment"], x["control"]) for x in summary["exploratory"]}
    assert asked == {("seed_fusion", "LoRA, half the steps", "lora"), ("seed_fusion", "copra", "LoRA, half the steps")}
    rows = summary["rows"]["seed_fusion"]["drug_reviews"]
    x = next(x for x in summary["exploratory"] if x["control"] == "lora")
    d = [
        100 * (b["accuracy"] - a["accuracy"])
        for t in config.tasks
        for a, b in zip(
            summary["rows"]["seed_fusion"][t]["lora"], summary["rows"]["seed_fusion"][t]["LoRA, half the steps"]
        )
    ]
    assert x["difference"] == pytest.approx(sum(d) / len(d)) and len(rows["LoRA, half the steps"]) == 2
    assert "Exploratory (no correction" in (tmp_path / "merge_protocol.md").read_text()
    with pytest.raises(UserError, match="steps_scale"):
        small_config(tiny_text_model, tmp_path / "x", controls={"bad": {"method": "lora", "steps_scale": 2}})


def test_fl_clients_with_their_own_inits_are_the_shared_init_control(tiny_text_model, tmp_path):
    from copra.experiments.runner.clients import one_shot_fl

    base = small_config(tiny_text_model, tmp_path).run_config("bbc_news", "lora", 3).replace(steps=4)
    shared = one_shot_fl(base, tmp_path / "run", 2)
    own = one_shot_fl(base, tmp_path / "run", 2, distinct_inits=True)
    seeds = [
        json.loads((tmp_path / f"run/client{k}of2-own-init/result.json").read_text())["config"]["seed"] for k in (0, 1)
    ]
    assert seeds == [3001, 3002]
    assert json.loads((tmp_path / "run/client0of2/result.json").read_text())["config"]["seed"] == 3
    assert any(not torch.equal(shared[k], own[k]) for k in shared if "lora_A" in k)  # other inits, other A
