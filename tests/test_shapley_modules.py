"""Per-module Shapley values (granularity "module") in the Shapley experiment: values, stderrs, heat map."""

from __future__ import annotations

import numpy as np
import pytest

from copra.experiments.shapley_layers import ShapleyConfig, block_label, draw, module_grid, run_from_adapters
from copra.utils.errors import UserError

from conftest import train_lora_and_copra


def test_module_grid_places_each_player_in_its_block_and_projection():
    players = [f"encoder.layer.{b}.attention.self.{p}" for b in range(2) for p in ("query", "key", "value")]
    blocks, projections, grid = module_grid(players[:-1], list(range(5)))  # block 1 lacks its value module
    assert blocks == ["encoder.layer.0", "encoder.layer.1"] and projections == ["query", "key", "value"]
    assert grid[0].tolist() == [0, 1, 2] and grid[1, :2].tolist() == [3, 4] and np.isnan(grid[1, 2])


@pytest.mark.parametrize(
    "block, label",
    [
        ("encoder.layer.3", "3"),
        ("text_model.encoder.layers.11", "text_model 11"),
        ("vision_model.encoder.layers.0", "vision_model 0"),
        ("transformer.h.2", "transformer 2"),
    ],
)
def test_block_labels_keep_towers_apart(block, label):
    assert block_label(block) == label


def test_module_level_shapley_experiment(tiny_text_model, tmp_path):
    data, adapters = train_lora_and_copra(tiny_text_model, tmp_path)
    shapley = ShapleyConfig(
        seeds=[0],
        samples=8,
        eval_examples=20,
        model=tiny_text_model,
        granularity="module",
        overrides={"max_length": 16},
        output_dir=str(tmp_path / "out"),
    )
    summary = run_from_adapters(adapters, shapley, data)
    for method in ("lora", "copra"):
        row = summary["methods"][method]
        assert len(row["players"]) == 9 and row["players"][1] == "encoder.layer.0.attention.self.key"
        run = row["runs"][0]
        assert run["method"] == "multilinear"  # 8 samples cannot pay for 2^9 coalitions: sampled
        assert len(run["stderr"]) == 9 and len(row["estimator_se"]) == 9
        if np.ptp(run["values"]) > 0:
            assert all(se > 0 for se in run["stderr"])  # the variance floor: never falsely exact
        # 9 players <= 16: the exact values are there to compare, and they are efficient
        assert sum(run["exact"]) == pytest.approx(run["v_full"] - run["v_empty"], abs=1e-9)
    text = (tmp_path / "out" / "shapley.md").read_text()
    assert "| block | query | key | value |" in text and "Per-module" in text
    assert (tmp_path / "out" / "shapley.png").is_file()
    heat_maps = [ax for ax in draw(summary).axes if ax.images]  # one per method (the colour bar has none)
    for ax, method in zip(heat_maps, ("lora", "copra"), strict=True):  # rows: blocks, columns: q, k, v
        np.testing.assert_allclose(ax.images[0].get_array(), np.reshape(summary["methods"][method]["mean"], (3, 3)))


def test_unknown_granularity_is_refused():
    with pytest.raises(UserError, match="granularity"):
        ShapleyConfig(granularity="head")
