"""Per-method lr selection on the validation split (issue 12), on the tiny encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from copra.experiments import lr_select
from copra.utils.errors import UserError


def test_best_lr_takes_the_best_mean_and_the_smaller_lr_on_ties():
    assert lr_select.best_lr({1e-3: [0.5, 0.7], 5e-3: [0.8, 0.2], 1e-2: [0.65, 0.6]}) == 1e-2
    assert lr_select.best_lr({5e-3: [0.6], 1e-3: [0.6]}) == 1e-3


def test_each_method_gets_its_own_lr_from_validation_scores(tiny_text_model, tmp_path, monkeypatch):
    from copra.models import evaluation

    seen = []
    real = evaluation.prepare_validation
    monkeypatch.setattr(
        evaluation, "prepare_validation", lambda config, examples: seen.append(examples) or real(config, examples)
    )
    config = lr_select.LrSelectConfig(
        model=tiny_text_model,
        lr_grid=[1e-3, 0.3],
        seeds=[0, 1],
        shots=2,
        steps=4,
        batch_size=4,
        validation_examples=30,
        overrides={"max_length": 16},
        output_dir=str(tmp_path),
        progress=False,
    )
    summary = lr_select.run(config)
    assert seen == [30] * 8  # every (method, lr, seed) scored on the validation split
    for method in ("lora", "copra"):
        scores = summary["scores"][method]
        assert set(scores) == {"0.001", "0.3"} and all(len(v) == 2 for v in scores.values())
        assert summary["best"][method] == lr_select.best_lr({float(k): v for k, v in scores.items()})
    saved = json.loads((Path(tmp_path) / "lr_select.json").read_text())
    assert saved["experiment"] == "lr_select" and saved["best"] == summary["best"]
    assert "Picked: lora lr" in (Path(tmp_path) / "lr_select.md").read_text()
    run = json.loads((Path(tmp_path) / "runs" / "val30" / "copra" / "lr=0.3" / "seed1" / "result.json").read_text())
    assert run["accuracy"] == summary["scores"]["copra"]["0.3"][1]
    seen.clear()
    assert lr_select.run(config)["scores"] == summary["scores"] and seen == []  # finished runs are reused


def test_bad_config():
    with pytest.raises(UserError, match="lr_grid has duplicates"):
        lr_select.LrSelectConfig(lr_grid=[1e-3, 1e-3])
    with pytest.raises(UserError, match="validation_examples"):
        lr_select.LrSelectConfig(validation_examples=0)
