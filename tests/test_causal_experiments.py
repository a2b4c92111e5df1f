"""The paper's experiments on a decoder LLM (issue 24: "everything the encoder path has"), on a tiny random Llama.

The experiments never ask which backbone they have: the run config names it (`backbone: causal`), and
`common.Evaluator` builds a classifier of that backbone. Each test checks that an experiment's scores
are the decoder's own: the accuracy an experiment measures for an adapter equals what training measured.
"""

import json
from pathlib import Path

import pytest
from causal_models import save_tiny_causal_model

from copra.adapters.io import read_metadata
from copra.experiments import federated, landscape, multitask, pruning, shapley_layers

DECODER = {"backbone": "causal", "target_modules": ["q_proj", "k_proj", "v_proj"], "precision": "fp32"}
FAST = dict(shots=2, steps=4, lr=0.05, batch_size=4, eval_examples=12, progress=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(save_tiny_causal_model(tmp_path_factory.mktemp("llama")))


def overrides() -> dict:
    return {**DECODER, "max_length": 16}


def test_landscape_and_multitask_score_the_decoder(llama, tmp_path):
    land = landscape.run(
        landscape.LandscapeConfig(
            model=llama,
            seeds=[0, 1],
            alphas=[0.0, 0.5, 1.0],
            align_steps=5,
            overrides=overrides(),
            output_dir=str(tmp_path / "land"),
            **FAST,
        )
    )
    for method, row in land["methods"].items():
        first, second = row["pairs"][0]
        assert json.loads((Path(first) / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
        assert row["inputs"][0]["alpha_1"] == pytest.approx(read_metadata(first)["accuracy"])
        assert row["inputs"][0]["alpha_0"] == pytest.approx(read_metadata(second)["accuracy"])
        assert row["diagnosis"]["barrier"] == pytest.approx(
            row["diagnosis"]["averaging"] + row["diagnosis"]["misalignment"]
        )
    mtl = multitask.run(
        multitask.MultitaskConfig(
            model=llama,
            tasks=["bbc_news", "news_outlets"],
            seeds=[0],
            methods=["copra"],
            scales=[1.0, 2.0],
            validation_examples=8,
            overrides=overrides(),
            output_dir=str(tmp_path / "mtl"),
            **FAST,
        )
    )
    run = mtl["methods"]["copra"]["runs"][0]
    for task, folder in run["adapters"].items():
        assert run["original"][task] == pytest.approx(read_metadata(folder)["accuracy"])  # the task's own prompts
    assert set(run["diagnostics"]["tasks"]) == {"bbc_news", "news_outlets"}


def test_pruning_and_shapley_values_on_the_decoder_blocks(llama, tmp_path):
    prune = pruning.run(
        pruning.PruningConfig(
            model=llama,
            seeds=[0],
            schemes=["all", "every_other"],
            sparsities=[0.0, 0.5],
            overrides=overrides(),
            output_dir=str(tmp_path / "prune"),
            **FAST,
        )
    )
    assert 0.0 <= prune["unstructured"]["copra"]["0.5"]["mean"] <= 1.0
    folder = tmp_path / "prune" / "runs" / "copra" / "seed0" / "adapter"
    assert prune["structured"]["copra"]["all"]["mean"] == pytest.approx(read_metadata(folder)["accuracy"])
    assert prune["unstructured"]["copra"]["0.0"]["mean"] == pytest.approx(read_metadata(folder)["accuracy"])
    values = shapley_layers.run(
        shapley_layers.ShapleyConfig(
            model=llama,
            seeds=[0],
            methods=["lora"],
            estimator="exact",
            compare_exact=False,
            overrides=overrides(),
            output_dir=str(tmp_path / "shapley"),
            **FAST,
        )
    )
    row = values["methods"]["lora"]["runs"][0]
    assert row["players"] == [f"model.layers.{i}" for i in range(3)]  # the 3 decoder blocks
    assert sum(row["values"]) == pytest.approx(row["v_full"] - row["v_empty"])  # efficiency of exact values


def test_federated_clients_and_merge_on_the_decoder(llama, tmp_path):
    config = federated.FederatedConfig(
        model=llama,
        methods=["copra"],
        clients=2,
        seeds=[0],
        shots=4,
        steps=3,
        batch_size=4,
        eval_examples=12,
        overrides=overrides(),
        output_dir=str(tmp_path / "fl"),
        progress=False,
    )
    summary = federated.run(config)
    folder = summary["runs"]["copra"][0]["adapter_dir"]
    assert json.loads((Path(folder) / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    # the merged adapter, scored again by a fresh decoder classifier on the same evaluation set
    from copra.adapters.io import load_adapter
    from copra.data.fewshot import prepare_data
    from copra.experiments.runner.common import Evaluator

    state, adapter_config = load_adapter(folder)
    again = Evaluator(config.client_config("copra", 0, 0, 0)).accuracy(
        state, adapter_config, prepare_data(config.data_config(0))
    )
    assert summary["summary"]["copra"]["merged_mean"] == pytest.approx(again)
