"""`copra reproduce`: the real suites resolve, a reduced suite runs end to end, resumes and refuses mixing."""

import json
from pathlib import Path

import pytest

from copra.cli import main
from copra.experiments.runner import common, eval_cache, runs
from copra.report import suite
from copra.report.suite import Step
from copra.utils.errors import UserError
from copra.utils.settings import dataclass_defaults

SMALL = [
    "--set",
    "shots=2",
    "--set",
    "steps=3",
    "--set",
    "batch_size=4",
    "--set",
    "eval_examples=20",
    "--set",
    "max_length=16",
    "--set",
    "seeds=0,1",
]


def test_real_suites_resolve_to_valid_configs(tmp_path):
    full = suite.resolve("full", {"seeds": [0, 1]})
    assert [s.name for s, _ in full] == [
        "federated",
        "federated_outlets",
        "multitask",
        "shapley",
        "landscape",
        "pruning",
        "sweep_lr",
        "sweep_iterations",
        "sweep_steps",
        "sweep_schedules",
    ]
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
    return [
        Step("pruning", "pruning", dict(task="bbc_news", sparsities=[0.0, 0.5], schemes=["all", "low"]), "Fig. 4"),
        Step("sweep_lr", "sweep", dict(name="sweep_lr", grid={"lr": [0.01, 0.3]}), "Fig. 5b"),
    ]


@pytest.mark.slow
def test_reduced_suite_runs_resumes_with_two_jobs_and_refuses_other_settings(
    monkeypatch, tmp_path, tiny_text_model, capsys
):
    monkeypatch.setitem(suite.SUITES, "full", _small_suite)
    out = tmp_path / "suite"
    argv = ["reproduce", "-o", str(out), "-q", "--set", f"model={tiny_text_model}"] + SMALL
    real_run = suite.EXPERIMENTS["sweep"]

    def killed():
        raise KeyboardInterrupt  # the suite dies in its second step

    monkeypatch.setitem(suite.EXPERIMENTS, "sweep", lambda: real_run()._replace(run=lambda c: killed()))
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
    code = main(
        ["reproduce", "-o", str(out), "-q", "--set", f"model={tiny_text_model}"] + SMALL[:-2] + ["--set", "seeds=0,2"]
    )
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
    result = suite.reproduce(
        "clip",
        out,
        {
            "model": str(model),
            "data_root": str(data),
            "tasks": "dtd",
            "shots": 2,
            "steps": 2,
            "batch_size": 4,
            "seeds": [0, 1],
            "eval_examples": 6,
            "alphas": [0.0, 0.5, 1.0],
            "sparsities": [0.0, 0.5],
        },
        progress=False,
        log=lambda line: None,
    )
    assert set(result["seconds"]) == keep
    saved = json.loads((out / "landscape" / "landscape.json").read_text())
    assert saved["config"]["overrides"]["backbone"] == "clip" and saved["task"] == "dtd"
    assert Path(result["report"][0]).is_file()


def test_converged_suite_resolves_with_the_issue_protocol():
    steps = {s.name: (s, c) for s, c in suite.resolve("converged", {})}
    assert list(steps) == [
        "lr_select",
        "federated",
        "crossover",
        "landscape",
        "pruning",
        "shapley",
        "crossover_long",
        "multitask",
        "schedules",
    ]
    assert steps["crossover_long"][1].steps == 1000 and steps["crossover_long"][1].curve_every == 100
    assert steps["crossover_long"][1].curve_prune == ["every_other"] and steps["multitask"][1].snapshot_curve
    assert all(c.shots == 16 for _, c in steps.values()) and steps["federated"][1].clients == 5
    assert steps["federated"][1].seeds == [0, 1, 2, 3, 4] and len(steps["landscape"][1].seeds) == 6
    assert all(s.selected_lr for name, (s, _) in steps.items() if name != "lr_select")
    assert "every_other" in steps["pruning"][1].schemes and steps["crossover"][1].curve_every > 0


def test_selected_lrs_reach_every_method():
    from copra.report import timing

    steps = {s.name: c for s, c in suite.resolve("converged", {})}
    landscape, sweep = steps["landscape"], steps["crossover"]
    suite.use_selected_lr(landscape, {"lora": 1e-3, "copra": 5e-3})
    suite.use_selected_lr(sweep, {"lora": 1e-3, "copra": 5e-3})
    assert landscape.run_config("copra", 0).lr == 5e-3 and landscape.run_config("lora", 0).lr == 1e-3
    assert sweep.run_config("CopRA", {}, 0).lr == 5e-3 and sweep.run_config("LoRA", {}, 0).lr == 1e-3
    plan = timing.planned_steps("landscape", landscape)
    assert plan == [(16, 300)] * 12  # 2 methods x 6 seeds
    assert timing.estimate({"landscape": plan}, 0.5, 16) == {"landscape": 12 * 300 * 0.5}
    assert timing.estimate({"x": [(32, 10)]}, 0.5, 16) == {"x": 10.0}  # twice the batch, twice the time


def test_manifest_without_lrs_still_matches(tmp_path):
    """Folders written before per-method lrs existed: an empty `lrs` is not a change of settings."""
    steps = suite.resolve("full", {"seeds": [0, 1]})
    manifest = suite._manifest("full", steps)
    old = json.loads(json.dumps(manifest))
    assert sum(settings.pop("lrs", None) == {} for settings in old["settings"].values()) > 0
    (tmp_path / "suite.json").write_text(json.dumps(old))
    suite.check_folder(tmp_path, manifest, {step.name: dataclass_defaults(type(config)) for step, config in steps})


def test_converged_suite_picks_lrs_first_and_prints_its_time(monkeypatch, tmp_path, tiny_text_model, capsys):
    def tiny():
        return [
            Step("lr_select", "lr_select", dict(lr_grid=[1e-3, 0.3], validation_examples=20), "lr"),
            Step(
                "pruning",
                "pruning",
                dict(task="bbc_news", sparsities=[0.0], schemes=["all", "every_other"]),
                "Fig. 4",
                selected_lr=True,
            ),
            Step("shapley", "shapley", dict(task="bbc_news", estimator="exact"), "Fig. 2", selected_lr=True),
        ]

    monkeypatch.setitem(suite.SUITES, "converged", tiny)
    out = tmp_path / "converged"
    trained = []
    real_train = runs.train
    monkeypatch.setattr(runs, "train", lambda *a, **k: trained.append(k.get("output_dir")) or real_train(*a, **k))
    assert (
        main(["reproduce", "--suite", "converged", "-o", str(out), "-q", "--set", f"model={tiny_text_model}"] + SMALL)
        == 0
    )
    err = capsys.readouterr().err
    assert "timing probe:" in err and "expected wall time" in err and "ms per evaluation example" in err
    assert err.index("timing probe:") < err.index("[lr_select] lr_select")  # printed before the first step
    best = json.loads((out / "lr_select" / "lr_select.json").read_text())["best"]
    pruning = json.loads((out / "pruning" / "pruning.json").read_text())
    assert pruning["config"]["lrs"] == best
    assert len(trained) == 4 and all(Path(d).parent == out / "runs" for d in trained)  # shapley reused pruning's
    for folder in pruning["adapters"]["lora"] + pruning["adapters"]["copra"]:
        run = json.loads((Path(folder).parent / "result.json").read_text())
        assert run["config"]["lr"] == best[run["config"]["method"]] and "converged" in run
    assert pruning["adapters"]["early_copra"]  # the store keeps every CopRA run's early checkpoint
    assert (
        main(["reproduce", "--suite", "converged", "-o", str(out), "-q", "--set", f"model={tiny_text_model}"] + SMALL)
        == 0
    )
    assert "[pruning] done before, kept" in capsys.readouterr().err
    # a pruning step killed after it had scored its adapters measures nothing again when it reruns
    assert eval_cache.is_cache(out / "evaluations")
    entries = sorted((out / "evaluations").glob("*.json"))
    assert entries
    (out / "pruning" / "pruning.json").unlink()
    monkeypatch.setattr(common, "accuracy", lambda *a, **k: pytest.fail("measured again"))
    assert (
        main(["reproduce", "--suite", "converged", "-o", str(out), "-q", "--set", f"model={tiny_text_model}"] + SMALL)
        == 0
    )
    assert json.loads((out / "pruning" / "pruning.json").read_text())["config"]["lrs"] == best
    assert sorted((out / "evaluations").glob("*.json")) == entries


def test_a_folder_made_before_a_field_existed_still_matches(tmp_path):
    """A key the stored settings lack reads as its default; a changed value is still refused."""
    defaults = {"merge_method": "fusion", "lrs": {}}
    assert suite.first_difference({"steps": 30}, {"steps": 30, "merge_method": "fusion", "lrs": {}}, defaults) is None
    assert suite.first_difference({"steps": 30}, {"steps": 30, "merge_method": "ties"}, defaults) == "merge_method"
    assert suite.first_difference({"steps": 30, "jobs": 1}, {"steps": 30, "jobs": 4}, {}) is None  # how, not what
    (tmp_path / "suite.json").write_text(
        json.dumps({"suite": "full", "version": suite.SUITE_VERSION, "settings": {"demo": {"steps": 30}}})
    )
    new = {
        "suite": "full",
        "version": suite.SUITE_VERSION,
        "settings": {"demo": {"steps": 30, "merge_method": "fusion"}},
    }
    suite.check_folder(tmp_path, new, {"demo": defaults})
    with pytest.raises(UserError, match="merge_method"):
        suite.check_folder(tmp_path, new, {"demo": {}})


def test_the_converged_suite_plans_each_shared_run_once():
    """Runs the landscape, pruning, Shapley, crossover and schedules steps share are counted (and trained) once."""
    plan = {
        name: sum(steps for _, steps in runs)
        for name, runs in suite._shared_plan(suite.resolve("converged", {}))[0].items()
    }
    assert plan["crossover"] == 6 * 2 * 300  # seeds x methods: the first step to plan the bbc_news runs
    assert plan["multitask"] == 5 * 2 * 300  # only news_outlets is new
    assert plan["landscape"] == plan["pruning"] == plan["shapley"] == 0
    assert plan["schedules"] == 3 * 6 * 300  # three new variants; LoRA and CopRA are the crossover's runs
    assert plan["crossover_long"] == 6 * 2 * 1000  # runs of another length: nothing to share


def test_mtl15_in_the_converged_suite():
    """`--set tasks=mtl15`: the multitask step merges all 15 tasks, single-task steps train the first (bbc_news)."""
    steps = {s.name: c for s, c in suite.resolve("converged", {"tasks": "mtl15"})}
    assert len(steps["multitask"].tasks) == 15 and steps["landscape"].task == steps["multitask"].tasks[0] == "bbc_news"
    steps = {s.name: c for s, c in suite.resolve("converged", {"tasks": ["news_outlets", "bbc_news"]})}
    assert steps["pruning"].task == "news_outlets" and steps["multitask"].tasks == ["news_outlets", "bbc_news"]


def test_a_folder_accepts_settings_that_only_add_measurements(tmp_path):
    """curve_prune / snapshot_curve add to a step's summary without changing its runs: the step runs again."""
    saved = {
        "suite": "converged",
        "version": suite.SUITE_VERSION,
        "settings": {"crossover_long": {"steps": 1000, "curve_every": 100}},
    }
    (tmp_path / "suite.json").write_text(json.dumps(saved))
    added = {
        **saved,
        "settings": {"crossover_long": {"steps": 1000, "curve_every": 100, "curve_prune": ["every_other"]}},
    }
    suite.check_folder(tmp_path, added, {"crossover_long": {"curve_prune": []}})
    with pytest.raises(UserError, match="curve_every"):
        suite.check_folder(tmp_path, {**saved, "settings": {"crossover_long": {"steps": 1000, "curve_every": 50}}})
    assert suite.first_difference({"curve_prune": []}, {"curve_prune": ["every_other"]}, {}) == "curve_prune"


def test_the_probe_counts_every_evaluation_the_steps_make(monkeypatch, tmp_path, tiny_text_model):
    """`timing.planned_evaluations` (plus each new run's own) is what every step scores, pass for pass."""
    from contextlib import nullcontext

    from copra.models import evaluation
    from copra.report import timing

    snapshots = {"snapshot_every": 2}  # runs of 3 steps keep step 2
    fused = {"LoRA": {"method": "lora"}, "CopRA": {"method": "copra"}}

    def tiny():
        return [
            Step("lr_select", "lr_select", dict(lr_grid=[1e-3, 0.3], validation_examples=12), "lr"),
            Step("federated", "federated", dict(clients=2, rounds=2), "FL", selected_lr=True),
            Step(
                "crossover",
                "sweep",
                dict(
                    name="crossover",
                    grid={},
                    variants=fused,
                    seeds=[0, 1, 2],
                    curve_every=2,
                    curve_prune=["every_other"],
                ),
                "x",
                selected_lr=True,
            ),
            Step(
                "landscape",
                "landscape",
                dict(seeds=[0, 1, 2], alphas=[0.0, 0.5], overrides=snapshots),
                "Fig. 3",
                selected_lr=True,
            ),
            Step(
                "pruning",
                "pruning",
                dict(sparsities=[0.0, 0.5], schemes=["all", "every_other", "query", "output"]),
                "Fig. 4",
                selected_lr=True,
            ),
            Step(
                "shapley",
                "shapley",
                dict(estimator="exact", compare_exact=False, overrides=snapshots),
                "Fig. 2",
                selected_lr=True,
            ),
            Step(
                "multitask",
                "multitask",
                dict(tasks=["bbc_news", "news_outlets"], overrides=snapshots, snapshot_curve=True),
                "MTL",
                selected_lr=True,
            ),
        ]

    monkeypatch.setitem(suite.SUITES, "converged", tiny)
    sets = {"model": tiny_text_model, "shots": 2, "steps": 3, "batch_size": 4, "eval_examples": 20, "max_length": 16}
    steps = suite.resolve("converged", dict(sets))
    seconds, model = timing.probe_evaluation(steps[-1][1].run_config("bbc_news", "lora", 0))
    assert seconds > 0 and model.players["module"] > model.players["layer"] > 0 and "query" in model.projections
    plan = suite._shared_plan(steps, model)[1]
    scored: dict[str, list[int]] = {}
    current = [None]
    real_predict = evaluation.predict
    monkeypatch.setattr(
        evaluation,
        "predict",
        lambda classifier, examples, *a, **k: (
            scored.setdefault(current[0], []).append(len(examples)) or real_predict(classifier, examples, *a, **k)
        ),
    )
    monkeypatch.setattr(suite, "cached_evaluations", lambda folder: nullcontext())  # count repeats as the plan does

    def log(line):
        if line.startswith("[") and "]" in line:
            current[0] = line[1 : line.index("]")]

    out = tmp_path / "suite"
    suite.reproduce("converged", out, dict(sets), progress=False, log=log)
    for step, _ in steps:
        sizes = [(len(evaluation.prepare_data(run).eval_x), count) for run, count in plan[step.name]]
        if step.name == "shapley":  # the coalition evaluator scores without `predict`: count its coalitions
            made = sum(
                r["evaluations"]
                for m in json.loads((out / "shapley" / "shapley.json").read_text())["methods"].values()
                for r in m["runs"]
            )
            assert made == sum(count for _, count in sizes) == 2 * 3 * 2 ** model.players["layer"], step.name
            continue
        assert len(scored.get(step.name, [])) == sum(count for _, count in sizes), step.name
        assert sum(scored.get(step.name, [])) == sum(size * count for size, count in sizes), step.name


def test_skip_leaves_steps_out_and_keeps_what_they_recorded(tmp_path, capsys):
    steps = suite.resolve("converged", {})
    kept = suite.skipped(steps, ["crossover_long", "schedules"], "converged")
    assert [s.name for s, _ in kept] == [
        "lr_select",
        "federated",
        "crossover",
        "landscape",
        "pruning",
        "shapley",
        "multitask",
    ]
    with pytest.raises(UserError, match="no such step; its steps are lr_select, federated"):
        suite.skipped(steps, ["crossover_lng"], "converged")
    with pytest.raises(UserError, match="skip lr_select: step 'federated' trains at the lrs it picks"):
        suite.skipped(steps, ["lr_select"], "converged")
    assert [
        s.name for s, _ in suite.skipped(steps, [s.name for s, _ in steps if s.name != "lr_select"], "converged")
    ] == ["lr_select"]
    # a run that skips a step keeps that step's recorded settings in suite.json (checked when it runs again)
    full = suite._manifest("converged", steps)
    (tmp_path / "suite.json").write_text(json.dumps(full))
    merged = suite._with_saved_steps(tmp_path, suite._manifest("converged", kept))
    assert merged["settings"] == full["settings"]
    # the CLI: a bad name is one line, exit 2, nothing written
    out = tmp_path / "new"
    assert main(["reproduce", "--suite", "converged", "-o", str(out), "--skip", "lr_select,nope"]) == 2
    assert "--skip nope" in capsys.readouterr().err and not out.exists()
