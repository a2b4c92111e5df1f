"""The pruning experiment end to end on the tiny encoder (real task, a few steps)."""

import json

import pytest

from copra.experiments.pruning import PruningConfig, draw, run_from_adapters
from copra.models.evaluation import prepare_data
from copra.training.loop import train
from copra.utils.errors import UserError

from conftest import bar_heights, errorbar_data, tiny_run_config, train_lora_and_copra


def test_pruning_experiment_tables_and_plot(tiny_text_model, tmp_path):
    config = tiny_run_config(tiny_text_model, steps=8, save_early=True)
    data = prepare_data(config)
    adapters = {"lora": [], "copra": [], "early_copra": []}
    for method in ("lora", "copra"):
        train(config.replace(method=method), data=data, output_dir=tmp_path / method)
        adapters[method].append(str(tmp_path / method / "adapter"))
    adapters["early_copra"].append(str(tmp_path / "copra" / "early"))
    pruning = PruningConfig(
        task="bbc_news",
        seeds=[0],
        eval_examples=20,
        sparsities=[0.0, 0.5, 0.9],
        model=tiny_text_model,
        overrides={"max_length": 16},
        output_dir=str(tmp_path / "out"),
    )
    results = run_from_adapters(adapters, data, pruning)
    for method in ("lora", "copra", "early_copra"):
        rows = results["structured"][method]
        assert set(rows) == {"all", "every_other", "low", "middle", "high", "query", "key", "value"}  # no output proj
        assert set(results["unstructured"][method]) == {"0.0", "0.5", "0.9"}
        # sparsity 0 changes nothing: equals the unpruned ("all") accuracy
        assert results["unstructured"][method]["0.0"]["mean"] == rows["all"]["mean"]
    saved = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert saved["task"] == "bbc_news"
    left, right = draw(saved).axes  # the PNG's figure, drawn from the saved summary
    schemes = [s for s in saved["config"]["schemes"] if s in saved["structured"]["lora"]]
    assert bar_heights(left) == [
        [pytest.approx(100 * saved["structured"][m][s]["mean"]) for s in schemes]
        for m in ("lora", "copra", "early_copra")
    ]
    assert errorbar_data(right) == [
        ([0.0, 0.5, 0.9], [pytest.approx(100 * saved["unstructured"][m][k]["mean"]) for k in ("0.0", "0.5", "0.9")])
        for m in ("lora", "copra", "early_copra")
    ]
    assert "| every_other |" in (tmp_path / "out" / "pruning.md").read_text()


@pytest.mark.parametrize(
    "bad", [dict(schemes=["diagonal"]), dict(sparsities=[1.0]), dict(sparsities=[-0.1]), dict(seeds=[])]
)
def test_pruning_config_refuses_bad_values(bad):
    with pytest.raises(UserError):
        PruningConfig(**bad)


def test_shapley_experiment_on_trained_adapters(tiny_text_model, tmp_path):
    from copra.experiments.shapley_layers import ShapleyConfig, run_from_adapters
    from copra.experiments.shapley_layers import draw as draw_shapley

    data, adapters = train_lora_and_copra(tiny_text_model, tmp_path)
    shapley = ShapleyConfig(
        seeds=[0],
        samples=16,
        eval_examples=20,
        model=tiny_text_model,
        overrides={"max_length": 16},
        output_dir=str(tmp_path / "out"),
    )
    summary = run_from_adapters(adapters, shapley, data)
    for method in ("lora", "copra"):
        row = summary["methods"][method]
        assert row["players"] == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
        run = row["runs"][0]
        # 16 samples pay for all 2^3 coalitions: the estimator returns the exact values, nothing to compare
        assert run["method"] == "exact" and "exact" not in run and row["max_abs_error"] is None
        assert sum(run["values"]) == pytest.approx(run["v_full"] - run["v_empty"], abs=1e-9)  # efficiency
    (axes,) = draw_shapley(json.loads((tmp_path / "out" / "shapley.json").read_text())).axes
    assert bar_heights(axes) == [pytest.approx(summary["methods"][m]["mean"]) for m in ("lora", "copra")]
    assert "| layer |" in (tmp_path / "out" / "shapley.md").read_text()
