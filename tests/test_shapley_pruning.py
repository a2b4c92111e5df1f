"""Shapley-guided pruning: pure choices (copra.adapters.prune), `copra prune --keep-by-shapley`, the experiment's scheme."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_prune import BERT, bert, clip, zeroed_blocks

from copra.adapters.prune import KEEP_SCHEMES, fixed_subset, keep_players, layer_ids, players_of, top_k
from copra.cli import main
from copra.utils.errors import UserError

from conftest import tiny_run_config

BLOCKS = [f"encoder.layer.{i}" for i in range(6)]


# -- pure choices ----------------------------------------------------------------------------------
def test_players_of_names_blocks_and_modules_as_the_gates_do():
    adapter = bert()
    assert players_of(adapter) == BLOCKS + ["pooler.dense"]  # a module outside the blocks is its own player
    modules = players_of(adapter, "module")
    assert modules[:2] == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key"]
    assert len(modules) == 6 * 5 + 1
    assert players_of(clip(3, 2))[:4] == [f"text_model.encoder.layers.{i}" for i in range(3)] + [
        "vision_model.encoder.layers.0"
    ]


@pytest.mark.parametrize(
    "scheme, k, kept",
    [
        ("every_other", 3, [0, 2, 4]),
        ("every_other", 2, [0, 3]),
        ("every_other", 1, [0]),
        ("low", 2, [0, 1]),
        ("middle", 2, [2, 3]),
        ("high", 2, [4, 5]),  # Fig. 4's thirds at K = 2
        ("middle", 1, [2]),
        ("middle", 3, [1, 2, 3]),
        ("high", 5, [1, 2, 3, 4, 5]),
        ("low", 6, list(range(6))),
    ],
)
def test_fixed_subsets_for_any_k(scheme, k, kept):
    assert fixed_subset(scheme, 6, k) == kept


def test_top_k_keeps_the_highest_values_in_model_order_ties_to_the_lower_index():
    assert top_k([0.1, 0.5, 0.5, -1.0, 0.3, 0.0], 3) == [1, 2, 4]
    assert top_k([0.2, 0.2, 0.2], 1) == [0]
    for bad in (0, 4, -1, 1.5, True):
        with pytest.raises(UserError, match="keep K must be an integer from 1 to 3"):
            top_k([0.1, 0.2, 0.3], bad)


def test_keep_players_zeroes_exactly_the_other_players():
    adapter = bert()
    pruned = keep_players(adapter, ["encoder.layer.1", "base_model.model.encoder.layer.4"])
    assert zeroed_blocks(adapter, pruned) == {f"{BERT}.{i}" for i in (0, 2, 3, 5)}
    pooler = "base_model.model.pooler.dense.lora_A.weight"  # outside the blocks: a player of its own, as in gates
    assert not pruned[pooler].any()
    assert torch.equal(keep_players(adapter, ["pooler.dense"])[pooler], adapter[pooler])
    one = keep_players(adapter, ["encoder.layer.2.attention.self.key"])  # module players
    nonzero = {k for k, v in one.items() if ".lora_" in k and bool(v.abs().sum() > 0)}
    assert nonzero == {f"{BERT}.2.attention.self.key.lora_A.weight", f"{BERT}.2.attention.self.key.lora_B.weight"}
    with pytest.raises(UserError, match="unknown player 'encoder.layer.9'"):
        keep_players(adapter, ["encoder.layer.9"])
    assert layer_ids(pruned) == layer_ids(adapter) and set(pruned) == set(adapter)  # keys kept: PEFT loads it


# -- `copra prune --keep-by-shapley` ------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_text_model, tmp_path_factory):
    """A tiny CopRA adapter (3 blocks) and its run config."""
    from copra.training.loop import train

    config = tiny_run_config(tiny_text_model, method="copra", steps=6, lr=0.3)
    out = tmp_path_factory.mktemp("trained")
    result = train(config, output_dir=out / "run")
    return config, result.adapter_dir


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _nonzero_blocks(folder):
    from copra.adapters.io import load_adapter

    state, _ = load_adapter(folder)
    return sorted({k.split(".")[4] for k, v in state.items() if ".lora_" in k and bool(v.abs().sum() > 0)})


def test_prune_keeps_the_top_k_of_a_values_file(capsys, tmp_path, trained):
    _, adapter = trained
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"players": [f"encoder.layer.{i}" for i in range(3)], "values": [0.1, -0.2, 0.3]}))
    code, out, err = _run(capsys, "prune", adapter, "--keep-by-shapley", values, "--keep", 2, "-o", tmp_path / "p")
    assert code == 0, err
    assert _nonzero_blocks(tmp_path / "p") == ["0", "2"]
    meta = json.loads((tmp_path / "p" / "copra.json").read_text())
    assert meta["keep_by_shapley"]["kept"] == ["encoder.layer.0", "encoder.layer.2"]
    # a `copra shapley` summary: the run of this very adapter is used
    summary = {
        "experiment": "shapley",
        "methods": {
            "copra": {
                "players": [f"encoder.layer.{i}" for i in range(3)],
                "mean": [0.0, 0.0, 0.0],
                "runs": [
                    {
                        "folder": str(adapter),
                        "players": [f"encoder.layer.{i}" for i in range(3)],
                        "values": [-0.5, 0.4, 0.1],
                    }
                ],
            }
        },
    }
    values.write_text(json.dumps(summary))
    code, _, err = _run(capsys, "prune", adapter, "--keep-by-shapley", values, "--keep", 1, "-o", tmp_path / "q")
    assert code == 0, err
    assert _nonzero_blocks(tmp_path / "q") == ["1"]


@pytest.mark.parametrize(
    "players, keep, message",
    [
        ([f"encoder.layer.{i}" for i in range(3)], 0, "keep K must be an integer from 1 to 3"),
        ([f"encoder.layer.{i}" for i in range(3)], 4, "keep K must be an integer from 1 to 3"),
        ([f"encoder.layer.{i}" for i in range(6)], 2, "not for this adapter's layers"),
        (["encoder.layer.0", "encoder.layer.0", "encoder.layer.1"], 1, "distinct player names"),
    ],
)
def test_bad_keep_input_is_one_line_exit_2_nothing_written(capsys, tmp_path, trained, players, keep, message):
    _, adapter = trained
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"players": players, "values": [0.1] * len(players)}))
    code, out, err = _run(capsys, "prune", adapter, "--keep-by-shapley", values, "--keep", keep, "-o", tmp_path / "p")
    assert code == 2 and err.startswith("copra: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--keep-by-shapley", "auto", "--keep", "1"], "needs --task"),
        (["--keep-by-shapley", "missing.json"], "needs --keep K"),
        (["--scheme", "low", "--keep", "1"], "--keep goes with --keep-by-shapley"),
        (["--keep-by-shapley", "missing.json", "--keep", "1"], "Shapley values file not found"),
    ],
)
def test_bad_keep_arguments(capsys, tmp_path, trained, extra, message):
    _, adapter = trained
    code, _, err = _run(capsys, "prune", adapter, *extra, "-o", tmp_path / "p")
    assert code == 2 and message in err and not (tmp_path / "p").exists()


def test_prune_auto_estimates_values_on_a_validation_split(capsys, tmp_path, trained):
    _, adapter = trained
    code, _, err = _run(
        capsys, "prune", adapter, "--keep-by-shapley", "auto", "--task", "bbc_news", "--keep", 2, "-o", tmp_path / "p"
    )
    assert code == 0, err
    meta = json.loads((tmp_path / "p" / "copra.json").read_text())["keep_by_shapley"]
    assert meta["source"] == "auto" and len(meta["values"]) == 3
    assert meta["kept"] == [meta["players"][i] for i in top_k(meta["values"], 2)]
    assert _nonzero_blocks(tmp_path / "p") == sorted(p.rsplit(".", 1)[-1] for p in meta["kept"])


def test_validation_split_is_disjoint_from_training_and_test(trained):
    from copra.models.evaluation import prepare_data, prepare_validation

    config, _ = trained
    data, validation = prepare_data(config), prepare_validation(config, 40)
    assert len(validation.eval_x) == 40 and validation.train_x == data.train_x
    assert not set(validation.eval_x) & set(data.train_x)
    assert not set(validation.eval_x) & set(data.eval_x)  # the embedded tasks' splits share no text
    other = config.replace(seed=1)  # another seed's split leaves out that seed's training examples
    assert not set(prepare_validation(other, 40).eval_x) & set(prepare_data(other).train_x)


# -- the pruning experiment's `shapley` scheme ----------------------------------------------------------
def test_pruning_experiment_keep_by_shapley(tmp_path, trained, tiny_text_model):
    from copra.adapters.io import load_adapter
    from copra.experiments.pruning import PruningConfig, run_from_adapters
    from copra.experiments.runner.common import Evaluator
    from copra.models.evaluation import prepare_data

    config, adapter = trained
    data = prepare_data(config)
    pruning = PruningConfig(
        task="bbc_news",
        seeds=[0],
        eval_examples=20,
        sparsities=[0.0],
        keep=[1, 2],
        schemes=["all", "low", "shapley"],
        random_subsets=2,
        validation_examples=30,
        model=tiny_text_model,
        overrides={"max_length": 16},
        output_dir=str(tmp_path / "out"),
    )
    results = run_from_adapters({"copra": [adapter]}, data, pruning)
    table = results["keep_by_shapley"]["methods"]["copra"]
    run = table["runs"][0]
    state, adapter_config = load_adapter(adapter)
    evaluator = Evaluator(pruning.base_config())
    for k in ("1", "2"):
        row = run["by_k"][k]
        assert row["kept"] == top_k(run["values"], int(k))
        assert set(row) >= {"shapley", *KEEP_SCHEMES, "random", "random_mean"}
        subsets = {tuple(subset) for subset in row["random_kept"]}  # C(3, k) = 3 > 2: two distinct draws
        assert len(row["random"]) == len(subsets) == 2 and all(len(subset) == int(k) for subset in subsets)
        # the gate-evaluated accuracy is the pruned adapter's accuracy
        kept = [run["players"][i] for i in row["kept"]]
        pruned = evaluator.accuracy(keep_players(state, kept), adapter_config, data)
        assert row["shapley"] == pytest.approx(pruned, abs=1e-6)
        best = table["summary"][k]["best_fixed"]
        assert best["mean"] == max(row[s] for s in KEEP_SCHEMES) and best["scheme"] in KEEP_SCHEMES
    # K = 2 of 3 blocks, "low" keeps blocks 0, 1: the same as the structured "low" third only at K = n/3
    assert np.isfinite(table["summary"]["2"]["random"]["mean"])
    text = (tmp_path / "out" / "pruning.md").read_text()
    assert "Keeping K layers by Shapley value" in text and "| 2 |" in text
    with pytest.raises(UserError, match="keep K must be an integer from 1 to 3"):
        run_from_adapters({"copra": [adapter]}, data, PruningConfig(**{**pruning.__dict__, "keep": [4]}))


@pytest.mark.parametrize(
    "bad",
    [
        dict(schemes=["shapley"], keep=[0]),
        dict(schemes=["shapley"], keep=[1, 1]),
        dict(schemes=["shapley"], random_subsets=0),
        dict(schemes=["diagonal"]),
    ],
)
def test_pruning_config_refuses_bad_keep_settings(bad):
    from copra.experiments.pruning import PruningConfig

    with pytest.raises(UserError):
        PruningConfig(**bad)
