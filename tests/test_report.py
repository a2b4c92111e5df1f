"""`copra report`: summaries found and ordered like the paper, verdicts, a self-contained page, clean errors.

No training: the results folder is built from hand-made summaries with the keys each experiment's
`render` reads, plus tiny PNGs.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from copra.cli import main
from copra.report import assemble as report
from copra.report import crossover, verdicts
from copra.utils.errors import UserError

LORA, COPRA = 0.80, 0.84  # the better method gets the higher number (or the lower step time)
NOISE = [0.0, 0.01, -0.01, 0.005]  # per seed, shared by both methods (what pairing removes)
JITTER = [0.0, 0.002, -0.002, 0.001]  # per seed, the better method's gain varies a little
FOLDERS = {
    "federated": "federated",
    "multitask": "multitask",
    "shapley": "shapley",
    "landscape": "landscape",
    "pruning": "pruning",
}


def ms(mean: float, std: float = 0.01) -> dict:
    return {"mean": mean, "std": std}


def per_seed(value: float, better: bool, scale: float = 1.0) -> list[float]:
    return [scale * (value + n + (j if better else 0.0)) for n, j in zip(NOISE, JITTER)]


def summaries(good: bool = True) -> dict[str, dict]:
    """One summary per experiment with per-seed scores; CopRA clearly ahead where `good`, LoRA otherwise."""
    c, lo = (COPRA, LORA) if good else (LORA, COPRA)
    acc = {"lora": lo, "copra": c}
    win = {"lora": not good, "copra": good}
    seeds = {"seeds": [0, 1, 2, 3], "shots": 8, "steps": 30, "batch_size": 16, "lr": 0.005, "model": "embedded:minilm"}
    tasks = ["bbc_news", "news_outlets"]
    fast = "copra" if good else "lora"
    pairs = lambda m, a: [[0.9, x, 0.9] for x in per_seed(a, win[m])[:3]]  # noqa: E731 consecutive seed pairs
    return {
        "demo": {
            "experiment": "demo",
            "config": {**seeds, "methods": ["lora", "copra"]},
            "core_seconds": 50.0,
            "wall_seconds": 95.0,
            "sections": {},
            "tasks": {
                t: {
                    "zero_shot": 0.5,
                    "classes": 5,
                    "runs": {
                        m: {
                            **ms(acc[m]),
                            "accuracy": per_seed(acc[m], win[m]),
                            "seconds_per_step": 0.1 if m == fast else 0.2,
                            "step_seconds": per_seed(0.1 if m == fast else 0.2, m == fast),
                        }
                        for m in acc
                    },
                }
                for t in tasks
            },
        },
        "federated": {
            "experiment": "federated",
            "task": "bbc_news",
            "eval_examples": 240,
            "wall_seconds": 480.0,
            "config": {**seeds, "clients": 5, "rounds": 1, "shared_init": False},
            "runs": {
                m: [{"seed": s, "rounds": [{"merged_accuracy": v}]} for s, v in enumerate(per_seed(a, win[m]))]
                for m, a in acc.items()
            },
            "summary": {
                m: {
                    "client_mean": 0.82,
                    "client_std": 0.01,
                    "merged_mean": a,
                    "merged_std": 0.005,
                    "merged_by_round": [a],
                    "merged_by_round_std": [0.005],
                }
                for m, a in acc.items()
            },
        },
        "multitask": {
            "experiment": "multitask",
            "tasks": tasks,
            "zero_shot": {t: 0.5 for t in tasks},
            "config": {**seeds, "align": False},
            "wall_seconds": 12.0,
            "methods": {
                m: {
                    "runs": [{"merged": {t: v for t in tasks}} for v in per_seed(a, win[m])],
                    **{
                        k: {**{t: ms(v) for t in tasks}, "average": ms(v)}
                        for k, v in (("original", 0.9), ("merged", a))
                    },
                }
                for m, a in acc.items()
            },
        },
        "shapley": {
            "experiment": "shapley",
            "task": "bbc_news",
            "wall_seconds": 30.0,
            "config": {**seeds, "metric": "accuracy", "estimator": "exact", "samples": 64, "compare_exact": False},
            "methods": {
                m: {
                    "players": [f"encoder.layer.{i}" for i in range(4)],
                    "max_abs_error": None,
                    "runs": [{"values": [v] * 4} for v in per_seed(a, win[m], 0.25)],
                    "mean": [a / 4] * 4,
                    "std": [0.01] * 4,
                }
                for m, a in acc.items()
            },
        },
        "landscape": {
            "experiment": "landscape",
            "task": "bbc_news",
            "alphas": [0.0, 0.5, 1.0],
            "wall_seconds": 20.0,
            "config": {**seeds, "align": True},
            "methods": {
                m: {
                    "pairs": [["a", "b"]] * 3,
                    "bound": {"before": 1.0, "after": 0.5, "gap_before": 0.2, "gap_after": 0.1},
                }
                for m in acc
            },
            "curves": {
                name: {
                    "method": name.split("/")[0].split("+")[0],
                    "merger": "fusion",
                    "align": "+align" in name,
                    "accuracy": pairs(m, a),
                    "mean": [0.9, a, 0.9],
                    "std": [0.0] * 3,
                    "barrier": 0.9 - a,
                }
                for name, m, a in (
                    ("lora/fusion", "lora", lo),
                    ("copra/fusion", "copra", c),
                    ("copra+align/fusion", "copra", c + (0.02 if good else -0.02)),
                )
            },
        },
        "pruning": {
            "experiment": "pruning",
            "task": "bbc_news",
            "wall_seconds": 40.0,
            "config": {**seeds, "schemes": ["all", "every_other", "high"], "sparsities": [0.0, 0.5]},
            "structured": {
                m: {
                    k: {**ms(v), "values": per_seed(v, win[m])}
                    for k, v in (("all", 0.9), ("every_other", a), ("high", a))
                }
                for m, a in acc.items()
            },
            "unstructured": {
                m: {k: {**ms(v), "values": per_seed(v, win[m])} for k, v in (("0.0", 0.9), ("0.5", a))}
                for m, a in acc.items()
            },
        },
    }


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> bytes:
    from matplotlib.figure import Figure

    path = tmp_path_factory.mktemp("png") / "tiny.png"
    Figure(figsize=(1, 1)).savefig(path, dpi=10)
    return path.read_bytes()


def make_results(root, png: bytes, good: bool = True):
    """A results folder as `copra demo` leaves it, plus JSON that is not a summary and an unknown experiment."""
    for name, summary in summaries(good).items():
        folder = root / FOLDERS.get(name, ".")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(summary))
        if name != "demo":
            (folder / f"{name}.png").write_bytes(png)
    adapter = root / "federated" / "adapters" / "lora" / "seed0"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 2}')
    (adapter / "copra.json").write_text('{"experiment": "federated", "method": "lora"}')  # metadata, not a summary
    (root / "runs").mkdir()
    (root / "runs" / "result.json").write_text('{"accuracy": 0.8}')
    (root / "report.md").write_text("the demo's report")
    unknown = root / "novel"
    unknown.mkdir()
    (unknown / "novel.json").write_text('{"experiment": "novel", "config": {"seeds": [7]}}')
    (unknown / "novel.md").write_text("# Novel\n\nA brand-new table.\n\n![novel](novel.png)\n")
    (unknown / "novel.png").write_bytes(png)
    return root


def headings(markdown: str) -> list[str]:
    return [line[3:].split(":")[0] for line in markdown.splitlines() if line.startswith("## ")]


def test_sections_in_paper_order_and_demo_report_kept(tmp_path, png):
    root = make_results(tmp_path / "results", png)
    md_path, html_path = report.write_report(root)
    markdown = md_path.read_text()
    assert headings(markdown) == [
        "Contents",
        "Runs",
        "Summary",
        "Table 1",
        "Table 1 (FL)",
        "Table 1 (MTL)",
        "Fig. 2",
        "Fig. 3",
        "Fig. 4",
        "Other",
    ]
    assert (root / "report.md").read_text() == "the demo's report" and html_path.name == "paper_report.html"
    assert "seeds 0, 1, 2, 3 · methods lora, copra · shots 8" in markdown and "wall time 8.0 min" in markdown
    assert "| merge | CopRA | **84.0 ± 0.5** | **84.0 ± 1.0** | **84.0 ± 1.0** |" in markdown  # assembled Table 1
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown):  # links resolve from the report's folder
        assert (root / link).is_file(), link


@pytest.mark.parametrize("good", [True, False])
def test_verdicts_follow_the_numbers(tmp_path, png, good):
    expected = verdicts.HELD if good else verdicts.REVERSED
    for name, summary in summaries(good).items():
        checks = verdicts.judge(name, summary)
        assert verdicts.overall(checks) == expected, (name, checks)
    markdown, _ = report.build_report(make_results(tmp_path, png, good))
    assert markdown.count(f"Here: **{expected}**.") == 6  # every known section
    assert "**Rules.** Every claim pairs CopRA and LoRA by seed" in markdown
    fl = markdown.split("## Table 1 (FL)")[1]
    assert (
        "CopRA 84.1 vs LoRA 80.1; CopRA − LoRA +4.0, 95% CI [+3.8, +4.3], 4 seeds"
        if good
        else "CopRA 80.1 vs LoRA 84.1; CopRA − LoRA -4.0, 95% CI [-4.3, -3.8], 4 seeds"
    ) in fl


def test_verdict_needs_per_seed_scores_and_pairs():
    old = summaries()["federated"]
    del old["runs"]  # a summary with means only, as older versions of some experiments wrote
    ((claim, status, numbers),) = verdicts.judge("federated", old)
    assert status == verdicts.UNMEASURED and "no per-seed scores" in numbers
    one = summaries()["federated"]
    one["runs"] = {m: runs[:1] for m, runs in one["runs"].items()}  # one seed: no interval
    ((_, status, numbers),) = verdicts.judge("federated", one)
    assert status == verdicts.NO_DIFFERENCE and "no interval, 1 seed" in numbers
    tie = summaries()["multitask"]
    tie["methods"]["copra"]["runs"] = [{"merged": {"a": v}} for v in (0.81, 0.79, 0.82, 0.78)]
    tie["methods"]["lora"]["runs"] = [{"merged": {"a": 0.8}}] * 4
    assert verdicts.judge("multitask", tie)[0][1] == verdicts.NO_DIFFERENCE


def test_combine_settings():
    H, R, N, U = verdicts.HELD, verdicts.REVERSED, verdicts.NO_DIFFERENCE, verdicts.UNMEASURED
    assert verdicts.combine([H, H, U]) == H and verdicts.combine([U]) == U
    assert verdicts.combine([H, N]) == verdicts.PARTLY and verdicts.combine([R, N]) == verdicts.PARTLY_REVERSED
    assert verdicts.combine([H, R, N]) == verdicts.MIXED and verdicts.combine([N, N]) == N


def test_missing_keys_say_not_measured():
    federated = summaries()["federated"]
    del federated["runs"]["copra"]
    assert verdicts.judge("federated", federated)[0][1] == verdicts.UNMEASURED
    landscape = summaries()["landscape"]
    del landscape["curves"]["copra+align/fusion"]
    assert [s for _, s, _ in verdicts.judge("landscape", landscape)] == [verdicts.HELD] * 2 + [verdicts.UNMEASURED]
    assert verdicts.overall(verdicts.judge("landscape", landscape)) == verdicts.HELD
    assert verdicts.overall(verdicts.judge("pruning", {"structured": "garbage"})) == verdicts.UNMEASURED
    assert verdicts.overall(verdicts.judge("novel", {})) == verdicts.UNMEASURED


def test_sweep_verdict_and_place():
    # 4 seeds: 6 pairs in combinations order, (0,1) and (2,3) disjoint; step seconds per seed
    rows = [
        {
            "variant": v,
            "label": f"lr={lr}",
            "merged": merged,
            "merged_mean": sum(merged) / 6,
            "single_mean": 0.8,
            "step_seconds": [t, t + 0.001, t - 0.001, t],
            "seconds_per_step": t,
        }
        for v, t, by_lr in (
            ("LoRA", 0.2, ([0.7] * 6, [0.8] * 6)),
            ("CopRA", 0.1, ([0.75, 0, 0, 0, 0, 0.751], [0.78, 0, 0, 0, 0, 0.81])),
        )
        for lr, merged in zip((1, 2), by_lr)
    ]
    checks = verdicts.judge("sweep", {"points": rows, "axes": ["lr"], "config": {"seeds": [0, 1, 2, 3]}})
    assert [s for _, s, _ in checks] == [verdicts.PARTLY, verdicts.HELD]
    assert "lr=1: held" in checks[0][2] and "lr=2: no difference shown" in checks[0][2]
    assert verdicts.SECTIONS["sweep"].place({"axes": ["steps", "lr"]}) == ("Fig. 6", 6.0)
    assert verdicts.SECTIONS["sweep"].place({"axes": ["lr"], "tsne": []})[0] == "Fig. 5a, 5b"


def test_curve_sweep_compares_best_settings_step_by_step():
    def row(variant, step_pairs):  # merged accuracies per step over the 3 pairs of 3 seeds
        means = [sum(p) / 3 for p in step_pairs]
        return {
            "variant": variant,
            "label": "default",
            "merged_mean": means[-1],
            "curve": {
                "steps": [10, 20],
                "merged_mean": means,
                "single_mean": means,
                "merged": step_pairs,
                "single": [[m] * 3 for m in means],
            },
        }

    rows = [
        row("LoRA lr 1e-3", [[0.5] * 3, [0.6] * 3]),
        row("LoRA lr 5e-3", [[0.7] * 3, [0.8] * 3]),
        row("CopRA lr 5e-3", [[0.75] * 3, [0.79] * 3]),
    ]
    ((claim, status, detail),) = verdicts.judge("sweep", {"points": rows, "axes": [], "config": {"seeds": [0, 1, 2]}})
    assert status == verdicts.NO_DIFFERENCE and "LoRA lr 5e-3" in detail and "step 10: CopRA − LoRA +5.0" in detail
    assert "1 seed" in detail  # 3 seeds make one disjoint pair: no interval
    assert verdicts.SECTIONS["sweep"].place({"points": rows, "axes": []})[0] == "Fig. 6c"


def test_runs_that_did_not_converge_are_listed(tmp_path, png):
    root = make_results(tmp_path, png)
    for name, converged, improvement in (("lora/seed0", True, 0.001), ("copra/seed0", False, 0.21)):
        (root / "runs" / name).mkdir(parents=True)
        (root / "runs" / name / "result.json").write_text(
            json.dumps(
                {
                    "config": {"method": name.split("/")[0], "task": "bbc_news", "seed": 0, "steps": 300},
                    "converged": converged,
                    "plateau": {"improvement": improvement},
                    "final_loss": 0.93,
                }
            )
        )
    markdown, _ = report.build_report(root)
    runs = markdown.split("## Runs: did every training run converge?")[1].split("\n## ")[0]
    assert "| copra | 1 | 0 | 1 | 0 |" in runs and "| lora | 1 | 1 | 0 | 0 |" in runs
    assert (
        "Runs that did not converge (1):" in runs
        and "| runs/copra/seed0 | copra | bbc_news | 0 | 300 | 0.210 |" in runs
    )
    assert "Runs that were not tested (1):" in runs  # the old result.json without the test
    fl = summaries()["federated"]  # federated clients keep their test in federated.json
    fl["runs"]["copra"][0]["rounds"][0].update(round=1, client_converged=[True, False], client_final_loss=[0.2, 0.9])
    (root / "federated" / "federated.json").write_text(json.dumps(fl))
    markdown, _ = report.build_report(root)
    assert "| federated/federated.json: seed 0 round 1 client 1 | copra | bbc_news | 0 | 30 | – | 0.900 |" in markdown


def crossover_sweep() -> dict:
    """A curve sweep over 4 seeds (pairs in combinations order; (0,1) and (2,3) are disjoint): CopRA behind at
    step 50, level at 100, clearly ahead at 300."""

    def row(variant, gains):
        merged = [[0.7 + g + 0.001 * k for k in range(6)] for g in gains]  # per step, per pair
        single = [[0.8 + g / 2 + 0.002 * k for k in range(4)] for g in gains]
        return {
            "variant": variant,
            "label": "default",
            "values": {},
            "merged_mean": sum(merged[-1]) / 6,
            "curve": {
                "steps": [50, 100, 300],
                "merged": merged,
                "single": single,
                "merged_mean": [sum(m) / 6 for m in merged],
                "single_mean": [sum(x) / 4 for x in single],
                "merged_std": [0.0] * 3,
            },
        }

    copra = row("CopRA", [-0.05, 0.0, 0.04])
    copra["curve"]["merged"][1] = [0.71, 0.7, 0.7, 0.7, 0.7, 0.69]  # step 100: +1 and -1 on the disjoint pairs
    return {
        "experiment": "sweep",
        "name": "crossover",
        "task": "bbc_news",
        "axes": [],
        "wall_seconds": 5.0,
        "config": {
            "seeds": [0, 1, 2, 3],
            "alpha": 0.5,
            "shots": 16,
            "steps": 300,
            "lr": 1e-3,
            "eval_examples": 9,
            "curve_every": 50,
        },
        "points": [row("LoRA", [0.0, 0.0, 0.0]), copra],
    }


def test_crossover_figure_comes_first(tmp_path, png):
    root = make_results(tmp_path / "results", png)
    (root / "crossover").mkdir()
    (root / "crossover" / "crossover.json").write_text(json.dumps(crossover_sweep()))
    md_path, html_path = report.write_report(root)
    markdown = md_path.read_text()
    assert headings(markdown)[:3] == ["Contents", "Crossover", "Runs"]
    section = markdown.split("## Crossover")[1].split("\n## ")[0]
    assert (
        "| 50 | -5.0 [-5.0, -5.0], reversed |" in section
        and "| 100 | -0.3 [-16.1, +15.6], no difference shown |" in section
        and "| 300 | +4.0 [+4.0, +4.0], held |" in section
    )
    assert "shown higher than LoRA's from step 300 on (1 of 3 steps)" in section
    assert "![crossover](paper_report_crossover.png)" in section
    assert (root / "paper_report_crossover.png").read_bytes()[:4] == b"\x89PNG"
    assert html_path.read_text().count("data:image/png;base64,") == 7  # 5 figures + novel + the crossover
    ((claim, status, detail),) = verdicts.judge("sweep", crossover_sweep())
    assert status == verdicts.MIXED and "step 300: CopRA − LoRA +4.0" in detail


def test_html_is_self_contained(tmp_path, png):
    root = make_results(tmp_path / "results", png)
    _, page = report.build_report(root)
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)  # 5 figures + novel
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', page))
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert '<span class="v held">held</span>' in page and '<div class="scroll"><table>' in page


def test_unknown_experiment_gets_a_generic_section(tmp_path, png):
    markdown, _ = report.build_report(make_results(tmp_path, png))
    section = markdown.split("## Other: novel")[1]
    assert "A brand-new table." in section and "![novel](novel/novel.png)" in section
    assert "# Novel" not in section and "seeds 7" in section and "not measured" in section


def test_lr_select_is_a_protocol_step_not_an_unmeasured_claim():
    checks = verdicts.judge("lr_select", {"experiment": "lr_select", "best": {"lora": 0.005, "copra": 0.001}})
    assert checks == [(checks[0][0], verdicts.PROTOCOL, "picked: lora 0.005, copra 0.001")]
    assert verdicts.overall(checks) == "protocol step"


def test_legacy_and_unreadable_summaries(tmp_path):
    summary = summaries()["federated"]
    del summary["experiment"]  # written before summaries named their experiment
    (tmp_path / "federated.json").write_text(json.dumps(summary))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "multitask.json").write_text('{"experiment": "multitask", "tasks": ["a", "b"]}')
    (tmp_path / "old" / "multitask.md").write_text("# MTL\n\nthe table written with it\n")
    assert [e.name for e in report.find_summaries(tmp_path)] == ["federated", "multitask"]
    markdown, _ = report.build_report(tmp_path)
    section = markdown.split("## Table 1 (MTL)")[1]  # the render cannot read it: the .md beside it instead
    assert "render cannot read the summary (KeyError" in section and "the table written with it" in section
    assert "not measured" in section


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: shutil.rmtree(root), "no such folder"),
        (lambda root: None, "no experiment summaries"),
        (lambda root: (root / "x.json").write_text('{"accuracy": 1}'), "no experiment summaries"),
        (lambda root: (root / "pruning.json").write_text('{"experiment": "pru'), "pruning.json: not valid JSON"),
    ],
)
def test_errors_write_nothing(tmp_path, capsys, setup, message):
    root = tmp_path / "results"
    root.mkdir()
    setup(root)
    with pytest.raises(UserError, match=message):
        report.write_report(root)
    out = tmp_path / "out"
    assert main(["report", str(root), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()
    assert not root.exists() or not any(p.name.startswith("paper_report") for p in root.iterdir())


def test_cli_writes_into_output_folder(tmp_path, png, capsys):
    root = make_results(tmp_path / "results", png)
    assert main(["report", str(root), "-o", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "paper_report.md").read_text()
    assert "paper_report.md" in capsys.readouterr().out
    assert "![client vs merged accuracy](../results/federated/federated.png)" in markdown


def test_schedule_variants_are_judged_against_their_lora_counterparts(tmp_path, png):
    """The converged suite's `schedules` sweep: each CopRA variant against the LoRA trained with the same lr
    schedule; the crossover figure stays the `crossover` sweep's, not a best-of pick among variants."""
    variants = {
        "LoRA": {"method": "lora"},
        "CopRA": {"method": "copra"},
        "LoRA, lr held 3/4": {"method": "lora", "lr_schedule": "hold_then_cosine"},
        "CopRA, lr held through the ramp": {"method": "copra", "lr_schedule": "hold_then_cosine"},
        "CopRA, ramp 1/2": {"method": "copra", "ramp_fraction": 0.5},
    }
    gains = {
        "LoRA": 0.0,
        "CopRA": 0.0,
        "LoRA, lr held 3/4": 0.0,
        "CopRA, lr held through the ramp": 0.05,
        "CopRA, ramp 1/2": -0.05,
    }
    rows = [
        {
            "variant": v,
            "label": "default",
            "values": {},
            "merged_mean": 0.7 + g,
            "merged": [0.7 + g + 0.001 * k for k in range(6)],
            "single": [0.8 + 0.002 * k for k in range(4)],
        }
        for v, g in gains.items()
    ]
    summary = {
        "experiment": "sweep",
        "name": "schedules",
        "task": "bbc_news",
        "axes": [],
        "config": {"seeds": [0, 1, 2, 3], "variants": variants, "grid": {}},
        "points": rows,
    }
    checks = {claim: (status, detail) for claim, status, detail in verdicts.judge("sweep", summary)}
    held = checks["CopRA, lr held through the ramp merges better than LoRA, lr held 3/4 (fused disjoint seed pairs)"]
    assert held[0] == verdicts.HELD and "+5.0" in held[1]
    assert checks["CopRA, ramp 1/2 merges better than LoRA (fused disjoint seed pairs)"][0] == verdicts.REVERSED
    assert checks["CopRA merges better than LoRA (fused disjoint seed pairs)"][0] == verdicts.NO_DIFFERENCE
    assert len(checks) == 6  # three CopRA variants x (merged, single)
    best_copra = crossover_sweep()
    best_copra["points"].append(dict(best_copra["points"][1], variant="CopRA, best on test", merged_mean=0.99))
    assert crossover.curves(best_copra)["names"] == ("CopRA", "LoRA")  # the named variant, not the best-scoring
    other, long = dict(crossover_sweep(), name="schedules"), dict(crossover_sweep(), name="crossover_long")
    found = crossover.figures(
        [(tmp_path / "a.json", other), (tmp_path / "b.json", crossover_sweep()), (tmp_path / "c.json", long)]
    )
    assert [path for path, *_ in found.values()] == [tmp_path / "b.json", tmp_path / "c.json"]


def test_crossover_adds_pruned_and_multitask_curves(tmp_path):
    summary = crossover_sweep()
    for row, gain in zip(summary["points"], (0.0, 0.03)):  # CopRA's pruned adapters 3 points ahead at every step
        row["curve"]["pruned"] = {"every_other": [[0.6 + gain + 0.01 * k for k in range(4)] for _ in range(3)]}
    data = crossover.curves(summary)
    assert [c.verdict for c in data["pruned"]["every_other"]] == ["held"] * 3
    assert "pruned (every_other): CopRA − LoRA, 95% CI" in crossover.table(data).splitlines()[0]
    assert "Pruned (every_other): CopRA shown higher at steps 50, 100, 300." in crossover.summary_line(data)
    mtl = {
        "experiment": "multitask",
        "tasks": ["bbc_news", "news_outlets"],
        "curve": {
            "steps": [50, 300],
            "merged": {"lora": [[0.7, 0.7, 0.72], [0.8, 0.81, 0.8]], "copra": [[0.6, 0.61, 0.6], [0.8, 0.81, 0.8]]},
        },
    }
    found = crossover.figures([(tmp_path / "s.json", summary), (tmp_path / "m.json", mtl)])
    assert [path.name for path, *_ in found.values()] == ["s.json", "m.json"]
    ((_, _, multi, image),) = [v for v in found.values() if v[0].name == "m.json"]
    assert [c.verdict for c in multi["merged"]] == ["reversed", "no difference shown"] and image[:4] == b"\x89PNG"
    lines = crossover.sections(found, tmp_path, None)
    assert any(line.startswith("*multitask on bbc_news, news_outlets, from m.json.") for line in lines)
    assert "| 50 | -10.3 [" in crossover.table(multi)
