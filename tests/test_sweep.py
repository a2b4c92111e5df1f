"""Sweeps (paper Fig. 5/6), adapter geometry (Fig. 5a) and run reuse / parallel runs, on the tiny encoder."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from copra.experiments import sweep
from copra.experiments.geometry import flatten, pair_similarity, tsne
from copra.experiments.runner import runs
from copra.training.loop import train
from copra.utils.errors import UserError

FAST = dict(shots=2, steps=4, batch_size=4, eval_examples=20, overrides={"max_length": 16}, progress=False)


@pytest.fixture(scope="module")
def lr_sweep(tiny_text_model, tmp_path_factory):
    config = sweep.SweepConfig(
        model=tiny_text_model,
        grid={"lr": [0.01, 0.3]},
        seeds=[0, 1, 2],
        geometry=True,
        curve_every=2,
        output_dir=str(tmp_path_factory.mktemp("sweep")),
        **FAST,
    )
    return config, sweep.run(config)


def test_sweep_has_every_variant_and_point_with_single_and_pairwise_merged(lr_sweep):
    config, summary = lr_sweep
    out = Path(config.output_dir)
    saved = json.loads((out / "sweep_lr.json").read_text())
    assert saved["experiment"] == "sweep" and saved["axes"] == ["lr"]
    assert [(r["variant"], r["values"]["lr"]) for r in saved["points"]] == [
        ("LoRA", 0.01),
        ("LoRA", 0.3),
        ("CopRA", 0.01),
        ("CopRA", 0.3),
    ]
    for row in saved["points"]:
        assert len(row["single"]) == 3 and len(row["merged"]) == 3  # 3 seeds, 3 pairs
        assert row["single_mean"] == pytest.approx(np.mean(row["single"]))
        assert 0 <= min(row["merged"]) and max(row["merged"]) <= 1
        assert -1 <= row["cosine_mean"] <= 1 and row["l2_mean"] > 0
    assert len(saved["tsne"]) == 12
    for row in saved["points"]:  # Fig. 6c: a snapshot at step 2, the final adapter at step 4
        assert row["curve"]["steps"] == [2, 4]
        assert row["curve"]["merged_mean"][-1] == pytest.approx(row["merged_mean"])
        assert row["curve"]["single_mean"][-1] == pytest.approx(row["single_mean"])
        assert row["curve"]["merged"][-1] == pytest.approx(row["merged"])  # per pair, for the paired verdicts
        assert row["curve"]["single"][-1] == pytest.approx(row["single"]) and len(row["step_seconds"]) == 3
    assert (out / "sweep_lr.png").read_bytes()[:4] == b"\x89PNG"
    assert "| CopRA | lr=0.3 |" in (out / "sweep_lr.md").read_text()


def test_merged_accuracy_is_the_fused_pair_evaluated(lr_sweep, tiny_text_model):
    """Recompute one merged number from the saved adapters with the library's own pieces."""
    from copra.adapters.io import load_adapter
    from copra.adapters.merge import fusion
    from copra.models.evaluation import prepare_data, state_accuracy
    from copra.training.loop import build_run

    config, summary = lr_sweep
    row = summary["points"][3]  # CopRA, lr 0.3
    folder = Path(config.output_dir) / "runs" / "sweep_lr" / "CopRA" / "lr=0.3"
    (a, _), (b, _) = load_adapter(folder / "seed0" / "adapter"), load_adapter(folder / "seed1" / "adapter")
    run_config = config.run_config("CopRA", {"lr": 0.3}, 0)
    classifier, _ = build_run(run_config)
    data = prepare_data(run_config)
    assert state_accuracy(classifier, fusion([a, b], [0.5, 0.5]), data) == pytest.approx(row["merged"][0])


def test_rerun_reuses_finished_runs_and_changed_config_trains_again(lr_sweep, monkeypatch):
    config, summary = lr_sweep
    calls = []
    monkeypatch.setattr(runs, "train", lambda *a, **k: calls.append(a) or train(*a, **k))
    again = sweep.run(config)
    assert calls == []  # every run reused from its folder
    assert [r["single"] for r in again["points"]] == [r["single"] for r in summary["points"]]
    folder = Path(config.output_dir) / "runs" / "sweep_lr" / "LoRA" / "lr=0.01" / "seed0"
    changed = config.run_config("LoRA", {"lr": 0.01}, 0).replace(steps=5)
    assert runs.finished(changed, folder) is None  # another config is never taken for this one
    (folder / "result.json").write_text("{ half written")
    assert runs.finished(config.run_config("LoRA", {"lr": 0.01}, 0), folder) is None


def test_two_axis_grid_and_baseline_variants_plot(tiny_text_model, tmp_path):
    config = sweep.SweepConfig(
        name="grid",
        model=tiny_text_model,
        grid={"steps": [2, 4], "lr": [0.01, 0.3]},
        seeds=[0, 1],
        variants={
            "LoRA": {"method": "lora"},
            "stochastic depth": {"method": "copra", "initial_p": 0.5, "final_p": 0.5},
        },
        output_dir=str(tmp_path),
        **{k: v for k, v in FAST.items() if k != "steps"},
    )
    summary = sweep.run(config)
    assert len(summary["points"]) == 8 and summary["axes"] == ["steps", "lr"]
    saved = json.loads((tmp_path / "grid.json").read_text())
    figure = sweep.draw(saved)  # the PNG's figure, drawn from the saved summary
    variants = list(config.variants)
    assert [ax.get_title() for ax in figure.axes] == [
        f"{v}: {kind}" for kind in ("single", "merged") for v in variants
    ]
    for ax, (kind, variant) in zip(figure.axes, [(k, v) for k in ("single", "merged") for v in variants]):
        cells = {
            (r["values"]["steps"], r["values"]["lr"]): 100 * r[f"{kind}_mean"]
            for r in saved["points"]
            if r["variant"] == variant
        }
        expected = [[cells[steps, lr] for lr in (0.01, 0.3)] for steps in (2, 4)]  # rows: steps, columns: lr
        np.testing.assert_allclose(ax.images[0].get_array(), expected)
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_schedule_variant_set_is_valid():
    config = sweep.SweepConfig(variants="schedules", grid={}, seeds=[0, 1], output_dir="unused")
    assert "stochastic depth p=0.5" in config.variants and config.points() == [{}]


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(grid={"seed": [0, 1]}), "'seed' is not a TrainConfig key"),
        (dict(grid={"lr": [1e-3]}, variants={"x": {"lr": 1e-2}}), "also set by variant"),
        (dict(grid={"lr": [1e-3], "steps": [1], "rank": [2]}), "at most two"),
        (dict(variants="nope"), "unknown variant set"),
        (dict(variants={"x": {"bogus": 1}}), "'bogus'"),
        (dict(seeds=[0]), "seeds"),
        (dict(alpha=2), "alpha"),
        (dict(grid={"lr": [-1.0]}), "lr"),
        (dict(name="../x"), "name"),
    ],
)
def test_bad_sweep_configs_are_refused(changes, message):
    with pytest.raises(UserError, match=message):
        sweep.SweepConfig(output_dir="unused", **changes)


def test_geometry_on_hand_made_adapters():
    a = {"m.lora_A.weight": torch.tensor([[1.0, 0.0]]), "m.lora_B.weight": torch.tensor([[0.0], [0.0]])}
    b = {"m.lora_A.weight": torch.tensor([[0.0, 2.0]]), "m.lora_B.weight": torch.tensor([[0.0], [0.0]])}
    assert flatten(a).tolist() == [1.0, 0.0, 0.0, 0.0]
    sim = pair_similarity([a, b, a])
    assert sim["cosine"] == pytest.approx([0.0, 1.0, 0.0]) and sim["l2"] == pytest.approx([5**0.5, 0.0, 5**0.5])
    points = [{"k.lora_A.weight": torch.randn(2, 3, generator=torch.Generator().manual_seed(i))} for i in range(5)]
    assert tsne(points).shape == (5, 2)
    with pytest.raises(UserError, match="at least 3"):
        tsne(points[:2])


@pytest.mark.slow
def test_parallel_runs_match_sequential(tiny_text_model, tmp_path):
    """--jobs 2: two spawned workers produce the same adapters as training in this process."""
    config = sweep.SweepConfig(
        model=tiny_text_model, grid={}, seeds=[0, 1], variants="paper", output_dir="unused", **FAST
    )
    plan = [
        (config.run_config(v, {}, s), tmp_path / "par" / v / str(s)) for v in config.variants for s in config.seeds
    ]
    parallel = runs.run_all(plan, jobs=2)
    sequential = [train(c, output_dir=tmp_path / "seq" / str(i)) for i, (c, _) in enumerate(plan)]
    for p, s in zip(parallel, sequential):
        assert p.accuracy == s.accuracy
        assert all(torch.equal(p.state[k], s.state[k]) for k in s.state)
    with pytest.raises(UserError, match="jobs"):
        runs.run_all(plan, jobs=0)


def test_run_all_continues_a_killed_run_from_its_checkpoint(tiny_text_model, tmp_path, monkeypatch):
    import copra.training.loop as training

    config = sweep.SweepConfig(model=tiny_text_model, grid={}, seeds=[0, 1], output_dir="unused", **FAST)
    run_config = config.run_config("CopRA", {}, 0).replace(checkpoint_every=1, steps=6)
    whole = train(run_config, output_dir=tmp_path / "whole")
    real_lr = training.lr_at

    def dies_at_step_4(step, *args):
        if step == 4:
            raise KeyboardInterrupt
        return real_lr(step, *args)

    monkeypatch.setattr(training, "lr_at", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(run_config, output_dir=tmp_path / "killed")
    monkeypatch.setattr(training, "lr_at", real_lr)
    assert runs.finished(run_config, tmp_path / "killed") is None
    (resumed,) = runs.run_all([(run_config, tmp_path / "killed")])
    assert resumed.resumed_from == 4
    assert all(torch.equal(resumed.state[k], whole.state[k]) for k in whole.state)


def test_curve_prune_scores_each_snapshot_pruned(tiny_text_model, tmp_path):
    """Issue 12's crossover for pruning: every snapshot (and the final adapter) pruned and scored."""
    from copra.adapters.io import load_adapter
    from copra.adapters.prune import structured
    from copra.models.evaluation import prepare_data, state_accuracy
    from copra.training.loop import build_run
    from copra.training.run_folder import SNAPSHOTS_DIR

    config = sweep.SweepConfig(
        name="pruned",
        model=tiny_text_model,
        grid={},
        seeds=[0, 1],
        curve_every=2,
        curve_prune=["every_other"],
        output_dir=str(tmp_path),
        **FAST,
    )
    summary = sweep.run(config)
    row = summary["points"][1]  # CopRA
    pruned = row["curve"]["pruned"]["every_other"]
    assert row["curve"]["steps"] == [2, 4] and [len(p) for p in pruned] == [2, 2]
    folder = tmp_path / "runs" / "pruned" / "CopRA" / "default" / "seed1"
    state, _ = load_adapter(folder / SNAPSHOTS_DIR / "step-2")
    run_config = config.run_config("CopRA", {}, 1)
    classifier, _ = build_run(run_config)
    assert pruned[0][1] == pytest.approx(
        state_accuracy(classifier, structured(state, "every_other"), prepare_data(run_config))
    )
    with pytest.raises(UserError, match="curve_prune needs curve_every"):
        sweep.SweepConfig(curve_prune=["every_other"], **FAST)
    with pytest.raises(UserError, match="curve_prune"):
        sweep.SweepConfig(curve_every=2, curve_prune=["all"], **FAST)


def test_a_sweep_with_diagnostics_splits_each_points_barrier(tiny_text_model, tmp_path):
    config = sweep.SweepConfig(
        model=tiny_text_model, grid={}, seeds=[0, 1], diagnostics=True, output_dir=str(tmp_path), **FAST
    )
    summary = sweep.run(config)
    for row in summary["points"]:
        d = row["diagnostics"]
        assert d["fused"] == pytest.approx(100 * row["merged_mean"])  # the same fused pairs, on the same data
        assert d["single"] == pytest.approx(100 * row["single_mean"])
        assert d["barrier"] == pytest.approx(d["averaging"] + d["misalignment"])
    assert "Merge diagnostics" in (tmp_path / "sweep_lr.md").read_text()
