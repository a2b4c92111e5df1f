"""`copra demo --model smollm2` (copra.experiments.llm_demo) end to end on a tiny random Llama: every number comes
from a real evaluation, the intervals are the bootstrap's of the stored outcomes, a second run reuses
everything, and bad input is one line with nothing written."""

import json
from pathlib import Path

import pytest
import torch
from causal_models import save_tiny_causal_model

from copra.adapters.io import load_adapter
from copra.adapters.ops import merge_folders
from copra.adapters.prune import drop_layers
from copra.analysis.protocol import bootstrap_paired
from copra.cli import main
from copra.experiments import llm_demo
from copra.models.evaluation import load_adapter_state, predict
from copra.training.loop import build_run

TASKS = ["bbc_news", "drug_reviews"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo on a 4-block tiny Llama, run twice into one folder: (config, first summary, second, log lines)."""
    model = save_tiny_causal_model(tmp_path_factory.mktemp("llama") / "m", layers=4)
    out = tmp_path_factory.mktemp("demo") / "results"
    config = llm_demo.LLMDemoConfig(
        tasks=TASKS,
        shots=2,
        steps=6,
        batch_size=4,
        lr=0.2,  # a random tiny Llama needs big steps before its predictions move
        eval_examples=12,
        model=str(model),
        overrides={"max_length": 16, "lora_alpha": 16, "answer_score": "mean"},
        precision="fp32",
        resamples=2000,
        output_dir=str(out),
        progress=False,
    )
    lines: list[tuple[str, int]] = []

    def log(line):  # with the number of finished runs at that moment: the estimate comes before training
        lines.append((line, len(list(out.glob(f"{llm_demo.RUNS}/*/*/*/result.json")))))

    first = llm_demo.run(config, log=log)
    second = llm_demo.run(config, log=log)
    return config, first, second, lines


def _scorer(config, task):
    """A fresh classifier and the task's evaluation data, built the way `copra train` builds them."""
    return build_run(config.run_config(task, "lora", config.seeds[0]))


def _correct(classifier, data, state=None) -> str:
    """`predict`'s per-example correctness ("1"/"0"), with `state` loaded first (None: as the classifier is)."""
    if state is not None:
        load_adapter_state(classifier, state)
    hits = (predict(classifier, data.eval_x) == torch.tensor(data.eval_y)).tolist()
    return "".join("1" if hit else "0" for hit in hits)


def test_expected_time_is_printed_before_training(demo):
    _, first, second, lines = demo
    (estimate, finished_then), (again, _) = lines
    assert estimate.startswith("expected time: about ") and finished_then == 0
    assert "training 8 runs of 6 steps" in estimate and "s per probed LoRA step" in estimate
    assert "every run finished before: reused" in again


@pytest.mark.parametrize("task", TASKS)
def test_fused_pruned_and_zero_shot_numbers_are_real_evaluations(demo, tmp_path, task):
    """Recomputed independently: `copra merge`'s folders, drop_layers, a fresh B=0 classifier, scored by `predict`."""
    config, first, _, _ = demo
    row, runs = first["tasks"][task], Path(config.output_dir) / llm_demo.RUNS / task
    classifier, data = _scorer(config, task)
    assert len(data.eval_y) == row["eval_examples"] == 12
    assert _correct(classifier, data) == row["zero_shot"]["correct"]  # a fresh LoRA: B = 0
    for method in llm_demo.METHODS:
        pair = [runs / method / f"seed{s}" / "adapter" for s in config.seeds]
        fused = merge_folders(pair, output=tmp_path / method)
        assert _correct(classifier, data, load_adapter(fused)[0]) == row["methods"][method]["fused"][0]["correct"]
        for k, folder in enumerate(pair):
            state = load_adapter(folder)[0]
            single = row["methods"][method]["single"][k]
            assert _correct(classifier, data, state) == single["correct"]
            assert single["accuracy"] == pytest.approx(single["correct"].count("1") / 12)
            pruned = _correct(classifier, data, drop_layers(state, [1, 3]))  # the tiny Llama's 4 blocks
            assert pruned == row["methods"][method]["pruned"][k]["correct"]


def test_intervals_are_the_bootstrap_of_the_stored_outcomes(demo):
    config, first, _, _ = demo
    for row in first["tasks"].values():
        methods = row["methods"]
        patterns = {o["correct"] for m in methods.values() for kind in m.values() for o in kind}
        assert len(patterns) >= 4  # the adapters disagree: the comparisons below are not all zero
        for kind in llm_demo.KINDS:
            c = row["comparisons"][kind]
            assert c["low"] <= c["difference"] <= c["high"]
            mean = {m: llm_demo.mean_accuracy(methods[m][kind]) for m in llm_demo.METHODS}
            assert c["difference"] == pytest.approx(mean["copra"] - mean["lora"])
            rows = [[[int(x) for x in o["correct"]] for o in methods[m][kind]] for m in ("copra", "lora")]
            again = bootstrap_paired(rows[0], rows[1], 0.95, config.resamples)
            assert (c["low"], c["high"]) == pytest.approx((100 * again.low, 100 * again.high))
            assert c["rows"] == (1 if kind == "fused" else 2) and c["examples"] == row["eval_examples"]


def test_outputs_hold_the_table(demo):
    config, first, _, _ = demo
    out = Path(config.output_dir)
    saved = json.loads((out / "llm_demo.json").read_text())
    assert saved["experiment"] == "llm_demo" and saved["tasks"].keys() == first["tasks"].keys()
    markdown = (out / "llm_demo.md").read_text()
    assert llm_demo.table(first) in markdown and llm_demo.gains_table(first) in markdown
    lora_fused = llm_demo.mean_accuracy(first["tasks"][TASKS[1]]["methods"]["lora"]["fused"])
    assert f"| fused seed pair (1/2) | {lora_fused:.1f} |" in markdown
    assert (out / "llm_demo.png").stat().st_size > 1000


def test_a_second_run_reuses_every_run_and_outcome(demo):
    config, first, second, _ = demo
    assert first["trained"] == 8 and second["trained"] == 0 and second["measured"] == 0
    assert first["measured"] == 2 * (1 + 2 * 5)  # per task: zero-shot, then 2 singles, 1 pair, 2 pruned per method
    assert llm_demo.table(second) == llm_demo.table(first)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "nonsense"], "invalid choice: 'nonsense'"),
        (["--model", "smollm2", "--tasks", "covid_intents,nope"], "'nope'"),
        (["--model", "smollm2", "--seeds", "0,1,2"], "even number of seeds"),
        (["--model", "smollm2", "--sections", "pruning"], "--sections belongs to the encoder demo"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, argv, message):
    out = tmp_path / "results"
    code = main(["demo", "-o", str(out), "-q", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("copra: error:") and message in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []
