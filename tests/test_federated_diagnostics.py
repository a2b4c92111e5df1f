"""copra federated's last merge beside its controls (issue 23): mixture, each client at w_i^2, a validated lambda."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from copra.adapters.io import load_adapter
from copra.adapters.merge import fusion, scale_update
from copra.data.fewshot import prepare_shared_validation
from copra.experiments import federated_diagnostics
from copra.experiments.federated import FederatedConfig, render, resume_settings, run
from copra.federated.resume import Progress
from copra.models.evaluation import load_adapter_state, prepare_data, score_examples
from copra.training.loop import build_run
from copra.utils.errors import UserError

SCALES = [0.5, 1.0, 4.0]


def fed_config(model: str, tmp_path, **overrides) -> FederatedConfig:
    values = dict(
        task="bbc_news", model=model, clients=3, rounds=1, seeds=[0], methods=["copra"], shots=2,
        batch_size=4, eval_examples=20, overrides={"max_length": 16}, output_dir=str(tmp_path / "fed"),
        progress=False, scales=SCALES, validation_examples=30, steps=8, lr=0.2,
    )  # fmt: skip
    return FederatedConfig(**(values | overrides))


@pytest.fixture(scope="module")
def finished(tiny_text_model, tmp_path_factory):
    """(config, summary) of a one-seed, three-client copra federated run with diagnostics."""
    config = fed_config(tiny_text_model, tmp_path_factory.mktemp("diagnostics"))
    return config, run(config)


def test_the_controls_are_the_servers_merge_and_its_clients_scored_again(finished):
    config, summary = finished
    (entry,) = summary["runs"]["copra"]
    d, last = entry["diagnostics"], entry["rounds"][-1]
    sizes = entry["client_sizes"]
    assert d["members"] == [0, 1, 2] and d["weights"] == pytest.approx([n / sum(sizes) for n in sizes])
    # scored by the Evaluator from the clients' states; the run scored them through other paths
    assert d["fused"]["accuracy"] == pytest.approx(last["merged_accuracy"], abs=1e-12)
    assert [c["accuracy"] for c in d["clients"]] == pytest.approx(last["client_accuracy"], abs=1e-12)
    assert len(d["fused"]["correct"]) == summary["eval_examples"]


def scored(classifier, state, data) -> tuple[float, float]:
    """(accuracy, cross-entropy) through the run's own classifier, not the diagnostics' Evaluator."""
    load_adapter_state(classifier, state)
    got = score_examples(classifier, data.eval_x, data.eval_y)
    return got.accuracy, got.cross_entropy


def test_each_client_at_its_share_and_lambda_recomputed_independently(finished):
    config, summary = finished
    (entry,) = summary["runs"]["copra"]
    d = entry["diagnostics"]
    data = prepare_data(config.data_config(0))
    classifier, _ = build_run(config.client_config("copra", 0, 0, 0), data)
    clients = Progress(Path(config.output_dir) / "progress").load("copra-seed0").clients  # what each client sent
    w = d["weights"][1]
    want = scored(classifier, scale_update(clients[1], w * w), data)
    assert (d["fused_share"][1]["accuracy"], d["fused_share"][1]["cross_entropy"]) == pytest.approx(want, abs=1e-9)
    merged, _ = load_adapter(entry["adapter_dir"])  # the server's merge as saved, not the diagnostics' own fusion
    validation = prepare_shared_validation([config.data_config(0)], config.validation_examples)
    assert set(validation.eval_x).isdisjoint(data.eval_x) and set(validation.eval_x).isdisjoint(data.train_x)
    for scale in SCALES:
        want = scored(classifier, scale_update(merged, scale), validation)
        got = d["validation"][str(scale)]
        assert (got["accuracy"], got["cross_entropy"]) == pytest.approx(want, abs=1e-9)
    by = d["validation"]
    best = max(SCALES, key=lambda s: (by[str(s)]["accuracy"], -by[str(s)]["cross_entropy"]))
    assert d["scale"] == best  # the validation argmax (ties: the lower cross-entropy)
    assert len({by[str(s)]["cross_entropy"] for s in SCALES}) == len(SCALES)  # the scales did change the scores
    assert (d["scaled"]["accuracy"], d["scaled"]["cross_entropy"]) == pytest.approx(
        scored(classifier, scale_update(merged, best), data), abs=1e-9
    )
    for key, value in fusion(clients, d["weights"]).items():
        assert (merged[key] - value).abs().max() < 1e-6


def test_barrier_is_averaging_plus_misalignment_in_accuracy_and_cross_entropy(finished):
    config, summary = finished
    s = summary["summary"]["copra"]["diagnostics"]
    (entry,) = summary["runs"]["copra"]
    d = entry["diagnostics"]
    client = sum(c["accuracy"] for c in d["clients"]) / 3
    assert s["barrier"] == pytest.approx(100 * (client - d["fused"]["accuracy"]))
    assert s["averaging"] == pytest.approx(100 * (client - d["mixture"]["accuracy"]))
    for unit in ("", "_ce"):
        assert s["barrier" + unit] == pytest.approx(s["averaging" + unit] + s["misalignment" + unit])
    client_ce = sum(c["cross_entropy"] for c in d["clients"]) / 3
    assert s["barrier_ce"] == pytest.approx(d["fused"]["cross_entropy"] - client_ce)  # a loss: merged - client
    share = sum(c["accuracy"] for c in d["fused_share"]) / 3
    assert s["shrinkage"] == pytest.approx(100 * (client - share)) and s["scale"] == d["scale"]
    markdown = render(summary)
    assert (Path(config.output_dir) / "federated.md").read_text() == markdown
    assert "| copra | " in markdown and f"{s['barrier']:+.1f} |" in markdown


def test_a_finished_run_resummarised_gives_the_same_diagnostics(finished):
    config, summary = finished
    again = run(config)  # nothing trained: the clients' adapters come from progress/
    assert again["runs"]["copra"][0]["diagnostics"] == summary["runs"]["copra"][0]["diagnostics"]
    saved = json.loads((Path(config.output_dir) / "progress" / "copra-seed0.json").read_text())
    assert saved["clients"] == "copra-seed0-round1-clients.safetensors"


def test_progress_recorded_before_the_clients_were_kept_skips_the_controls_with_a_reason(finished, tmp_path):
    config, _ = finished
    shutil.copytree(config.output_dir, tmp_path / "old")
    record_file = tmp_path / "old" / "progress" / "copra-seed0.json"
    record = json.loads(record_file.read_text())
    del record["clients"]
    record_file.write_text(json.dumps(record))
    summary = run(dataclasses.replace(config, output_dir=str(tmp_path / "old")))
    assert summary["runs"]["copra"][0]["diagnostics"] == {
        "skipped": "the last round's client adapters were not kept (progress recorded before copra kept them)"
    }
    assert "diagnostics" not in summary["summary"]["copra"]


def test_diagnostics_do_not_change_what_a_run_must_share_to_continue(tmp_path):
    on = FederatedConfig(methods=["copra"], seeds=[0], output_dir=str(tmp_path))
    off = FederatedConfig(methods=["copra"], seeds=[0], output_dir=str(tmp_path), diagnostics=False, scales=[2.0])
    assert resume_settings(on) == resume_settings(off)


def test_merges_that_are_not_a_fusion_skip_the_controls_with_a_reason(tmp_path):
    def skipped(**settings):
        return federated_diagnostics.skipped(FederatedConfig(methods=["copra"], seeds=[0], **settings))

    assert skipped() is None
    assert "differential privacy" in skipped(dp_noise_multiplier=1.0, dp_clip_norm=1.0, norm_factor=0.0)
    assert skipped(aggregate="median") == "aggregate=median: the merge is not a fusion"
    assert skipped(merge_method="ties") == "merge_method=ties: the merge is not a fusion"
    assert "clip_norm" in skipped(clip_norm=1.0)
    summary = {"summary": {"copra": {}}, "diagnostics_skipped": "aggregate=median: the merge is not a fusion"}
    from copra.experiments.federated_render import diagnostics_table

    assert diagnostics_table(summary) == ["No merge diagnostics (aggregate=median: the merge is not a fusion).", ""]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"diagnostics": "yes"}, "diagnostics must be true or false"),
        ({"scales": [1.0, 1.0]}, "scales must be a list of distinct positive numbers"),
        ({"scales": [0.0]}, "scales must be a list of distinct positive numbers"),
        ({"scales": 2.0}, "scales must be a list of distinct positive numbers"),
        ({"validation_examples": 0}, "validation_examples must be a positive integer"),
    ],
)
def test_bad_diagnostics_settings_are_refused(bad, message):
    with pytest.raises(UserError, match=message):
        FederatedConfig(methods=["copra"], seeds=[0], **bad)
