"""`copra reproduce`: the real suites resolve, a reduced suite runs end to end, resumes and refuses mixing."""

import json
from pathlib import Path

import pytest

from copra.cli import main
from copra.errors import UserError
from copra.experiments import runs, suite
from copra.experiments.suite import Step

SMALL = ["--set", "shots=2", "--set", "steps=3", "--set", "batch_size=4", "--set", "eval_examples=20",
         "--set", "max_length=16", "--set", "seeds=0,1"]


def test_real_suites_resolve_to_valid_configs(tmp_path):
    full = suite.resolve("full", {"seeds": [0, 1]})
    assert [s.name for s, _ in full] == ["federated", "federated_outlets", "multitask", "shapley", "landscape", "pruning", "sweep_lr",
                                         "sweep_iterations", "sweep_steps", "sweep_schedules"]
    assert all(c.seeds == [0, 1] for _, c in full)
    clip = suite.resolve("clip", {"model": "/clip", "data_root": "/data", "tasks": "dtd,eurosat"})
    by_name = {s.name: c for s, c in clip}
    assert by_name["multitask"].tasks == ["dtd", "eurosat"] and by_name["pruning"].task == "dtd"
    assert by_name["pruning"].overrides == {"preset": "clip-lora", "backbone": "clip", "data_root": "/data"}
    assert by_name["landscape"].lr == 2e-4 and by_name["landscape"].steps == 8000
    with pytest.raises(UserError, match="model=PATH"):
        suite.resolve("clip", {})
    with pytest.raises(UserError, match="no step"):
        suite.resolve("full", {"bogus": 1})
    with pytest.raises(UserError, match="unknown suite"):
        suite.resolve("tiny", {})


def _small_suite():
    return [Step("pruning", "pruning", dict(task="bbc_news", sparsities=[0.0, 0.5], schemes=["all", "low"]), "Fig. 4"),
            Step("sweep_lr", "sweep", dict(name="sweep_lr", grid={"lr": [0.01, 0.3]}), "Fig. 5b")]


@pytest.mark.slow
def test_reduced_suite_runs_resumes_with_two_jobs_and_refuses_other_settings(monkeypatch, tmp_path, tiny_text_model,
                                                                             capsys):
    monkeypatch.setitem(suite.SUITES, "full", _small_suite)
    out = tmp_path / "suite"
    argv = ["reproduce", "-o", str(out), "-q", "--set", f"model={tiny_text_model}"] + SMALL
    real_run = suite.EXPERIMENTS["sweep"]

    def killed():
        raise KeyboardInterrupt  # the suite dies in its second step

    monkeypatch.setitem(suite.EXPERIMENTS, "sweep", lambda: (real_run()[0], lambda c: killed(), real_run()[2]))
    assert main(argv) == 130
    assert (out / "pruning" / "pruning.json").is_file() and not (out / "sweep_lr" / "sweep_lr.json").exists()
    monkeypatch.setitem(suite.EXPERIMENTS, "sweep", real_run)
    trained = []
    real_train = runs.train
    monkeypatch.setattr(runs, "train", lambda *a, **k: trained.append(k.get("output_dir")) or real_train(*a, **k))
    assert main(argv + ["--jobs", "2"]) == 0
    err = capsys.readouterr().err
    assert "[pruning] done before, kept" in err and "[sweep_lr] sweep" in err
    assert not any("pruning" in str(d) for d in trained)  # nothing of the finished step trained again
    assert (out / "sweep_lr" / "sweep_lr.json").is_file()
    report = (out / "paper_report.md").read_text()
    assert "sweep_lr" in report or "Fig. 5" in report
    manifest = json.loads((out / "suite.json").read_text())
    assert manifest["suite"] == "full" and manifest["version"] == suite.SUITE_VERSION
    # the same folder with other settings is refused, nothing rewritten
    before = (out / "suite.json").read_bytes()
    code = main(["reproduce", "-o", str(out), "-q", "--set", f"model={tiny_text_model}"] + SMALL[:-2] + ["--set", "seeds=0,2"])
    assert code == 2 and "seeds=[0, 1]" in capsys.readouterr().err
    assert (out / "suite.json").read_bytes() == before


def test_clip_suite_steps_run_on_tiny_clip(monkeypatch, tmp_path):
    from tests.test_clip import write_dtd, write_tiny_clip

    model = write_tiny_clip(tmp_path / "clip")
    data = write_dtd(tmp_path / "data")
    keep = {"landscape", "pruning"}
    real = suite.clip_suite
    monkeypatch.setitem(suite.SUITES, "clip", lambda: [s for s in real() if s.name in keep])
    out = tmp_path / "out"
    result = suite.reproduce("clip", out, {"model": str(model), "data_root": str(data), "tasks": "dtd", "shots": 2,
                                           "steps": 2, "batch_size": 4, "seeds": [0, 1], "eval_examples": 6,
                                           "alphas": [0.0, 0.5, 1.0], "sparsities": [0.0, 0.5]},
                             progress=False, log=lambda line: None)
    assert set(result["seconds"]) == keep
    saved = json.loads((out / "landscape" / "landscape.json").read_text())
    assert saved["config"]["overrides"]["backbone"] == "clip" and saved["task"] == "dtd"
    assert Path(result["report"][0]).is_file()
