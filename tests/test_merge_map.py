"""The barrier map (issue 23): merge diagnostics, the shared validation set, cells, resume, outputs."""

import json
from pathlib import Path

import pytest
import torch

from copra.adapters.io import load_adapter
from copra.adapters.merge import delta_weights, fusion, mixture, scale_update
from copra.core.config import make_config
from copra.data.fewshot import prepare_data, prepare_shared_validation
from copra.experiments import merge_map
from copra.experiments.runner.common import Evaluator, zero_b
from copra.experiments.runner.diagnostics import summarise
from copra.models.evaluation import score_examples
from copra.utils.errors import UserError

FAST = dict(shots=2, steps=4, batch_size=4, eval_examples=20, overrides={"max_length": 16}, progress=False)


def test_scale_update_scales_every_update_and_nothing_else():
    a = {"m.lora_A.weight": torch.randn(2, 5), "m.lora_B.weight": torch.randn(3, 2), "m.bias": torch.randn(3)}
    scaled = scale_update(a, 0.25)
    assert torch.allclose(delta_weights(scaled)["m"], 0.25 * delta_weights(a)["m"])
    assert torch.equal(scaled["m.lora_A.weight"], a["m.lora_A.weight"]) and torch.equal(scaled["m.bias"], a["m.bias"])
    with pytest.raises(UserError, match="finite"):
        scale_update(a, float("nan"))


def test_fusion_is_the_shrunk_own_updates_plus_the_cross_terms():
    """The algebra the diagnostics rest on: fused = mixture/2 + cross terms/4 at weights 1/2."""
    a1 = {"m.lora_A.weight": torch.randn(2, 5, dtype=torch.float64), "m.lora_B.weight": torch.randn(3, 2).double()}
    a2 = {"m.lora_A.weight": torch.randn(2, 5, dtype=torch.float64), "m.lora_B.weight": torch.randn(3, 2).double()}
    b1, b2, x1, x2 = a1["m.lora_B.weight"], a2["m.lora_B.weight"], a1["m.lora_A.weight"], a2["m.lora_A.weight"]
    fused = delta_weights(fusion([a1, a2], [0.5, 0.5]))["m"]
    own = delta_weights(scale_update(a1, 0.25))["m"] + delta_weights(scale_update(a2, 0.25))["m"]
    assert torch.allclose(fused, own + (b1 @ x2 + b2 @ x1) / 4)
    assert torch.allclose(2 * own, delta_weights(mixture([a1, a2], [0.5, 0.5]))["m"])


def test_shared_validation_excludes_every_seeds_sample_and_the_test_split(tiny_text_model):
    configs = [make_config({"model": tiny_text_model, "task": "bbc_news", "shots": 4, "seed": s}) for s in (0, 1, 2)]
    data = prepare_shared_validation(configs, 60)
    trained = set().union(*(prepare_data(c).train_x for c in configs))
    test = set(prepare_data(configs[0].replace(eval_examples=None)).eval_x)
    assert len(data.eval_x) == 60 and not (set(data.eval_x) & trained) and not (set(data.eval_x) & test)
    again = prepare_shared_validation(list(reversed(configs)), 60)
    assert again.eval_x == data.eval_x  # no seed decides it: every run of the task is scored on it
    with pytest.raises(UserError, match="one task"):
        prepare_shared_validation([configs[0], configs[1].replace(task="drug_reviews")], 60)


@pytest.fixture(scope="module")
def small_map(tiny_text_model, tmp_path_factory):
    config = merge_map.MergeMapConfig(
        model=tiny_text_model,
        tasks=["bbc_news"],
        seeds=[0, 1, 2],
        base={"rank": 2},
        axes={"lr": [0.01, 0.3], "deeper": [{"rank": 4, "lora_alpha": 16.0}]},
        validation_examples=30,
        merges=["seeds", "fl_dirichlet_1"],
        clients=2,
        keep_barrier=-100.0,  # every cell kept: the test checks the bookkeeping, not a result
        lr=0.01,
        output_dir=str(tmp_path_factory.mktemp("map")),
        **FAST,
    )
    return config, merge_map.run(config)


def test_cells_are_the_base_then_one_axis_at_a_time(small_map):
    config, summary = small_map
    assert [label for label, _ in config.cells()] == ["base", "lr=0.3", "deeper=rank=4,lora_alpha=16"]
    assert [(r["cell"], r["method"]) for r in summary["rows"]] == [
        (c, m) for c in ("base", "lr=0.3", "deeper=rank=4,lora_alpha=16") for m in ("lora", "copra")
    ]
    run = json.loads((Path(config.output_dir) / "runs/bbc_news/lr=0.3/copra/seed1/result.json").read_text())
    assert run["precision"]  # trained with the cell's settings:
    adapter = load_adapter(Path(config.output_dir) / "runs/bbc_news/deeper=rank=4_lora_alpha=16/lora/seed0/adapter")
    assert adapter[1]["r"] == 4


def test_the_diagnostics_are_the_merges_they_name(small_map, tiny_text_model):
    config, summary = small_map
    out = Path(config.output_dir)
    stored = json.loads((out / "cells/bbc_news/base/lora.json").read_text())
    adapters = [load_adapter(a) for a in stored["adapters"]]
    configs = [config.run_config("bbc_news", {}, "lora", s) for s in config.seeds]
    data = prepare_shared_validation(configs, config.validation_examples)
    evaluator = Evaluator(configs[0])
    d = stored["diagnostics"]
    fused01 = evaluator.scored(fusion([adapters[0][0], adapters[1][0]], [0.5, 0.5]), adapters[0][1], data)
    assert d["pairs"][0]["members"] == [0, 1]
    assert d["pairs"][0]["fused"]["accuracy"] == pytest.approx(fused01.accuracy)
    assert d["pairs"][0]["fused"]["correct"] == "".join("1" if c else "0" for c in fused01.correct.tolist())
    assert d["zero_shot"]["accuracy"] == pytest.approx(
        evaluator.scored(zero_b(adapters[0][0]), adapters[0][1], data).accuracy
    )
    quarter = evaluator.scored(scale_update(adapters[2][0], 0.25), adapters[2][1], data)
    assert d["fused_share"][2]["cross_entropy"] == pytest.approx(quarter.cross_entropy)
    s = summarise(d)
    pair_single = [(d["single"][i]["accuracy"] + d["single"][j]["accuracy"]) / 2 for i, j in ((0, 1), (0, 2), (1, 2))]
    fused = [p["fused"]["accuracy"] for p in d["pairs"]]
    assert s["barrier"] == pytest.approx(100 * sum(a - b for a, b in zip(pair_single, fused)) / 3)
    assert s["barrier"] == pytest.approx(s["averaging"] + s["misalignment"])
    assert summary["rows"][0]["barrier"] == pytest.approx(s["barrier"])


def test_score_examples_agrees_with_accuracy_and_the_training_loss(tiny_text_model):
    from copra.models import build_classifier
    from copra.models.evaluation import accuracy

    config = make_config(
        {"model": tiny_text_model, "task": "bbc_news", "shots": 2, "eval_examples": 24, "max_length": 16}
    )
    data = prepare_data(config)
    classifier = build_classifier(config)
    classifier.set_prompts(list(data.prompts))
    scored = score_examples(classifier, data.eval_x, data.eval_y)
    assert scored.accuracy == accuracy(classifier, data.eval_x, data.eval_y)
    with torch.no_grad():
        logits = classifier.logits(classifier.inputs_for(list(data.eval_x)))
    expected = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(data.eval_y))
    assert scored.cross_entropy == pytest.approx(float(expected), rel=1e-4)


def test_a_rerun_reuses_runs_and_evaluations_and_outputs_are_written(small_map):
    config, summary = small_map
    out = Path(config.output_dir)
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    again = merge_map.run(config)
    assert [r["barrier"] for r in again["rows"]] == [r["barrier"] for r in summary["rows"]]
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")} == before
    assert (out / "merge_map.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "merge_map.md").read_text()
    assert "| bbc_news | lr=0.3 | copra |" in text and "Cells where LoRA's barrier" in text
    assert len(summary["kept"]) == 3 and len(summary["where"]["points"]) == 3
    fit = summary["where"]["fit"]
    assert fit is None or fit["low"] <= fit["slope"] <= fit["high"]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(axes={"seed": [1]}), "not a TrainConfig key a cell may set"),
        (dict(axes={"lr": []}), "non-empty list"),
        (dict(base={"shots": 4}), "'shots' is not a TrainConfig key"),
        (dict(axes={"x": [{"bogus": 1}]}), "'bogus' is not a TrainConfig key"),
        (dict(seeds=[0]), "seeds"),
        (dict(merges=["seeds", "fl_skewed"]), "unknown client partition"),
        (dict(merges=["tasks"]), "unknown merge"),
        (dict(methods=["lora", "nope"]), "nope"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_text_model, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        merge_map.MergeMapConfig(
            **{"model": tiny_text_model, "tasks": ["bbc_news"], "output_dir": str(tmp_path), **change}
        )
    assert list(tmp_path.iterdir()) == []


def test_fl_merges_are_the_fusion_of_each_seeds_clients(small_map):
    from copra.experiments.runner.clients import dirichlet_shares

    config, summary = small_map
    out = Path(config.output_dir)
    row = summary["rows"][1]  # base, copra
    folder = out / "runs/bbc_news/base/copra/seed1"
    clients = [load_adapter(folder / f"client{k}of2-dirichlet_1" / "adapter") for k in range(2)]
    run = json.loads((folder / "client0of2-dirichlet_1" / "result.json").read_text())
    data = prepare_data(config.run_config("bbc_news", {}, "copra", 1))
    share = dirichlet_shares(data.train_y, 2, 1.0, seed=1)[0]
    assert run["config"]["steps"] == 2 and len(share) >= 1
    stored = json.loads((out / "cells/bbc_news/base/copra-fl_dirichlet_1.json").read_text())
    configs = [config.run_config("bbc_news", {}, "lora", s) for s in config.seeds]
    validation = prepare_shared_validation(configs, config.validation_examples)
    merged = Evaluator(configs[0]).scored(fusion([c[0] for c in clients], [0.5, 0.5]), clients[0][1], validation)
    assert stored["outcomes"][1]["accuracy"] == pytest.approx(merged.accuracy)
    assert row["barrier_fl_dirichlet_1"] == pytest.approx(row["single"] - row["fl_dirichlet_1"])
    assert "| fl_dirichlet_1 | barrier |" in (out / "merge_map.md").read_text()


def test_a_cell_that_changes_the_model_is_scored_on_that_model(tiny_text_model, tmp_path):
    """A depth cell (here a tiny Llama decoder) is evaluated with its own backbone, not the base cell's encoder."""
    from causal_models import save_tiny_causal_model

    llama = str(save_tiny_causal_model(tmp_path / "llama"))
    decoder = {"backbone": "causal", "model": llama, "target_modules": ["q_proj", "k_proj", "v_proj"]}
    config = merge_map.MergeMapConfig(
        model=tiny_text_model,
        tasks=["bbc_news"],
        seeds=[0, 1],
        methods=["lora"],
        base={"rank": 2},
        axes={"depth": [decoder]},
        validation_examples=12,
        lr=0.05,
        output_dir=str(tmp_path / "map"),
        **{**FAST, "overrides": {"max_length": 16, "precision": "fp32"}},
    )
    summary = merge_map.run(config)
    row = next(r for r in summary["rows"] if r["cell"].startswith("depth="))
    stored = json.loads(next((tmp_path / "map" / "cells" / "bbc_news").glob("depth=*/lora.json")).read_text())
    adapters = [load_adapter(a) for a in stored["adapters"]]
    assert adapters[0][1]["task_type"] == "CAUSAL_LM"
    cell = config.run_config("bbc_news", decoder, "lora", 0)
    data = prepare_shared_validation([config.run_config("bbc_news", {}, "lora", s) for s in config.seeds], 12)
    fresh = Evaluator(cell)  # a classifier built from the decoder's own config
    single = [fresh.scored(state, adapter_config, data).accuracy for state, adapter_config in adapters]
    assert row["single"] == pytest.approx(100 * sum(single) / 2)
