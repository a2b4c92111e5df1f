"""`copra reproduce --suite merge-regimes` on the tiny encoder: map, kept cell, protocol, pre-registration, report."""

import json

from copra.cli import main
from copra.report import suite
from copra.report.suite import Step, kept_cell

FAST = ["--set", "shots=2", "--set", "steps=4", "--set", "batch_size=4", "--set", "eval_examples=20"]
FAST += ["--set", "max_length=16", "--set", "validation_examples=20"]


def tiny_regimes():
    return [
        Step(
            "merge_map",
            "merge_map",
            dict(tasks=["bbc_news"], seeds=[0, 1, 2], base={"rank": 2}, axes={"lr": [0.3]}, lr=0.01),
            "map",
        ),
        Step(
            "merge_protocol",
            "merge_protocol",
            dict(
                tasks=["bbc_news", "drug_reviews"],
                seeds=[0, 1, 2, 3],
                endpoints=["seed_fusion", "mtl_retention", "prune_every_other"],  # FL: test_merge_protocol
                resamples=200,
                cell={"rank": 2},
            ),
            "answer",
            kept_cell=True,
        ),
    ]


def row(task, cell, barrier, overrides):
    return {"task": task, "cell": cell, "method": "lora", "barrier": barrier, "overrides": overrides}


def test_the_kept_cell_is_the_one_kept_in_most_tasks_then_the_largest_barrier():
    summary = {
        "config": {"base": {"rank": 2}},
        "rows": [
            row("a", "base", 1.0, {}),
            row("b", "base", 2.0, {}),
            row("a", "lr=0.02", 7.0, {"lr": 0.02}),
            row("b", "lr=0.02", 1.0, {"lr": 0.02}),
            row("a", "rank=8", 3.5, {"rank": 8}),
            row("b", "rank=8", 3.2, {"rank": 8}),
        ],
        "kept": [{"task": "a", "cell": "lr=0.02"}, {"task": "a", "cell": "rank=8"}, {"task": "b", "cell": "rank=8"}],
    }
    assert kept_cell(summary) == {"rank": 8}  # kept in two tasks, though lr=0.02 has the larger single barrier
    summary["kept"] = []
    assert kept_cell(summary) == {"rank": 2, "lr": 0.02}  # none kept: the largest mean barrier, on the base


def test_the_suite_maps_then_asks_at_the_kept_cell_and_the_report_leads_with_the_answer(
    monkeypatch, tmp_path, tiny_text_model, capsys
):
    monkeypatch.setitem(suite.SUITES, "merge-regimes", tiny_regimes)
    out = tmp_path / "regimes"
    argv = ["reproduce", "--suite", "merge-regimes", "-o", str(out), "-q", "--set", f"model={tiny_text_model}", *FAST]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "pre-registered: sha256" in err and "timing probe:" in err
    assert err.index("pre-registered") < err.index("[merge_map]")
    registered = json.loads((out / "preregistration.json").read_text())
    assert "merge_protocol" in registered["spec"]["settings"]
    the_map = json.loads((out / "merge_map" / "merge_map.json").read_text())
    protocol = json.loads((out / "merge_protocol" / "merge_protocol.json").read_text())
    assert protocol["config"]["cell"] == kept_cell(the_map)
    assert (out / "merge_protocol" / "preregistration.json").exists()  # the protocol's own, with its cell
    report = (out / "paper_report.md").read_text()
    assert report.index("Answer: Do CopRA's adapters merge") < report.index("Map: Where LoRA's merges break")
    assert "on seed_fusion (primary, Holm-adjusted)" in report

    assert main(argv) == 0
    assert "[merge_protocol] done before, kept" in capsys.readouterr().err
    assert main([*argv, "--set", "mtl_scales=1,2"]) == 2  # a changed pre-registration after results exist
    assert "refused" in capsys.readouterr().err
    assert json.loads((out / "preregistration.json").read_text()) == registered
