"""`copra tasks` and the MTL15 multi-task figure/table: listed tasks, zero-shot, expansion of `mtl15`."""

from __future__ import annotations

import pytest

from copra.cli import main
from copra.data.text_tasks import MTL15, load_task
from copra.experiments import multitask
from copra.experiments.task_table import render, task_rows
from copra.utils.errors import UserError


def test_tasks_command_lists_all_fifteen(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in MTL15:
        assert f"| {name} |" in out
    assert "zero-shot" not in out  # opt-in
    assert "| bbc_news | 5 | 1487 | 638 | `This news article is about {}.` |" in out


def test_tasks_command_rejects_unknown_names(capsys):
    assert main(["tasks", "bbc_news", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'nope'" in err and err.count("\n") == 1


def test_zero_shot_rows_on_the_tiny_encoder(tiny_text_model):
    from copra.core.config import make_config
    from copra.models import build_classifier
    from copra.models.evaluation import accuracy, prepare_data

    rows = task_rows(
        ["parl_party", "drug_reviews"],
        zero_shot=True,
        eval_examples=30,
        model=tiny_text_model,
        progress=False,
        max_length=16,
    )
    assert [r["name"] for r in rows] == ["parl_party", "drug_reviews"]
    assert [r["evaluated"] for r in rows] == [30, 30] and rows[0]["classes"] == load_task("parl_party").num_classes
    # the same number from a classifier built for that task alone (B = 0 LoRA is the base encoder)
    config = make_config(
        dict(task="drug_reviews", model=tiny_text_model, shots=1, eval_examples=30, progress=False, max_length=16)
    )
    data = prepare_data(config)
    classifier = build_classifier(config)
    classifier.set_prompts(list(data.prompts))
    assert rows[1]["zero_shot"] == pytest.approx(accuracy(classifier, data.eval_x, data.eval_y))
    assert "| drug_reviews | 3 |" in render(rows) and "zero-shot % (n)" in render(rows)


def test_multitask_takes_mtl15(tiny_text_model):
    config = multitask.MultitaskConfig(model=tiny_text_model, tasks="mtl15")
    assert config.tasks == list(MTL15)
    assert multitask.MultitaskConfig(model=tiny_text_model, tasks=["mtl15"]).tasks == list(MTL15)
    with pytest.raises(UserError, match="duplicates"):
        multitask.MultitaskConfig(model=tiny_text_model, tasks=["mtl15", "bbc_news"])
    with pytest.raises(UserError, match="may not set 'train_file'"):  # it would replace every task
        multitask.MultitaskConfig(model=tiny_text_model, overrides={"train_file": "x.csv"})


def _summary(tasks):
    """A multitask summary with made-up accuracies (the figure and table only read these fields)."""
    cell = lambda v: {"mean": v, "std": 0.01}  # noqa: E731
    methods = {}
    for m, shift in (("lora", 0.0), ("copra", 0.05)):
        methods[m] = {
            kind: {t: cell(0.5 + shift + (0.1 if kind == "original" else 0.0)) for t in [*tasks, "average"]}
            for kind in ("original", "merged")
        }
    return {
        "tasks": tasks,
        "zero_shot": {t: 0.4 for t in tasks},
        "methods": methods,
        "config": {"seeds": [0], "shots": 8, "steps": 30, "model": "m", "align": False},
    }


def test_mtl15_table_and_figure(tmp_path):
    summary = _summary(list(MTL15))
    table = multitask.table(summary)
    assert table.splitlines()[0] == "| task | zero-shot | origin LoRA | origin CopRA | merge LoRA | merge CopRA |"
    assert "| banking77 | 40.0 | 60.0 ± 1.0 | 65.0 ± 1.0 | 50.0 ± 1.0 | 55.0 ± 1.0 |" in table
    assert table.splitlines()[-1].startswith("| average | 40.0 |") and len(table.splitlines()) == 2 + 15 + 1
    path = multitask.plot(summary, tmp_path / "mtl15.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert "| | method |" in multitask.table(_summary(["bbc_news", "news_outlets"]))  # few tasks: the old layout
