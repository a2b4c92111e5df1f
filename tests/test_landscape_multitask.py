"""Merging experiments (paper Fig. 3 landscape, Table 1 MTL) and `merge_folders`, on the tiny encoder and real tasks."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from copra.adapters.align import align_many
from copra.adapters.io import load_adapter, read_metadata
from copra.adapters.merge import fusion, module_pairs
from copra.adapters.ops import merge_folders
from copra.cli import main
from copra.experiments import landscape, multitask
from copra.models.evaluation import accuracy, state_accuracy
from copra.training.loop import build_run
from copra.utils.errors import UserError

# lr 0.3: large enough that the two seeds' adapters (and the curves between them) predict differently
FAST = dict(shots=2, steps=6, lr=0.3, batch_size=4, eval_examples=20, overrides={"max_length": 16}, progress=False)


@pytest.fixture(scope="module")
def model(tiny_text_model):
    return tiny_text_model


@pytest.fixture(scope="module")
def land(model, tmp_path_factory):
    config = landscape.LandscapeConfig(
        model=model, seeds=[0, 1], align_steps=20, output_dir=str(tmp_path_factory.mktemp("landscape")), **FAST
    )
    return config, landscape.run(config)


@pytest.fixture(scope="module")
def folders(land):
    """{method: (seed-0 adapter folder, seed-1 adapter folder)} of bbc_news."""
    return {m: tuple(row["pairs"][0]) for m, row in land[1]["methods"].items()}


# ---- landscape (Fig. 3) -----------------------------------------------------------------------


def test_landscape_json_has_every_alpha_of_every_curve_and_png(land):
    config, summary = land
    out = Path(config.output_dir)
    saved = json.loads((out / "landscape.json").read_text())
    assert saved["alphas"] == [i / 10 for i in range(11)]
    names = {f"{m}/{k}" for m in ("lora", "copra") for k in ("fusion", "mixture")}
    names |= {"lora+align/fusion", "copra+align/fusion"}
    assert set(saved["curves"]) == names
    for curve in saved["curves"].values():
        assert len(curve["accuracy"]) == 1 and len(curve["accuracy"][0]) == 11 and len(curve["mean"]) == 11
        assert all(0.0 <= a <= 1.0 for a in curve["accuracy"][0])
    assert saved["classifiers_built"] == 2  # one rank-r classifier reused for every point, one rank-2r for mixtures
    for row in saved["methods"].values():
        assert row["bound"]["after"] <= row["bound"]["before"]
    assert (out / "landscape.png").read_bytes()[:4] == b"\x89PNG"
    assert "| copra+align/fusion |" in (out / "landscape.md").read_text()


def test_landscape_endpoints_are_the_input_adapters(land, folders):
    _, summary = land
    for method, (first, second) in folders.items():
        inputs = summary["methods"][method]["inputs"][0]
        # the evaluator reproduces the accuracy training measured for each adapter
        assert inputs["alpha_1"] == pytest.approx(read_metadata(first)["accuracy"])
        assert inputs["alpha_0"] == pytest.approx(read_metadata(second)["accuracy"])
        fused = summary["curves"][f"{method}/fusion"]["accuracy"][0]
        assert fused[-1] == inputs["alpha_1"] and fused[0] == inputs["alpha_0"]
        mixed = summary["curves"][f"{method}/mixture"]["accuracy"][0]
        assert mixed[-1] == pytest.approx(inputs["alpha_1"], abs=0.051)  # exact update; rounding may flip 1 of 20
        assert mixed[0] == pytest.approx(inputs["alpha_0"], abs=0.051)


def test_landscape_midpoints_match_fresh_models(land, folders, model, tmp_path):
    """A fused point equals a freshly built classifier; a mixed point equals PEFT loading the saved mixture."""
    from peft import PeftModel
    from transformers import AutoModel

    from copra.models.text import PromptClassifier

    config, summary = land
    first, second = folders["copra"]
    (sa, _), (sb, _) = load_adapter(first), load_adapter(second)
    classifier, data = build_run(config.run_config("copra", 0))
    want = state_accuracy(classifier, fusion([sa, sb], [0.3, 0.7]), data)
    assert summary["curves"]["copra/fusion"]["accuracy"][0][3] == pytest.approx(want)
    out = merge_folders([first, second], "mixture", [0.3, 0.7], output=tmp_path / "mix")
    encoder = PeftModel.from_pretrained(AutoModel.from_pretrained(model, add_pooling_layer=False), str(out))
    peft_classifier = PromptClassifier(encoder, classifier.tokenizer, max_length=16)
    peft_classifier.set_prompts(list(data.prompts))
    assert summary["curves"]["copra/mixture"]["accuracy"][0][3] == pytest.approx(
        accuracy(peft_classifier, data.eval_x, data.eval_y), abs=0.051
    )


def test_landscape_diagnosis_splits_the_midpoint_barrier(land):
    """The diagnostics at 1/2 agree with the curves' midpoints, and barrier = averaging + misalignment."""
    config, summary = land
    mid = summary["alphas"].index(0.5)
    for method, row in summary["methods"].items():
        d, inputs = row["diagnosis"], row["inputs"][0]
        assert d["single"] == pytest.approx(50 * (inputs["alpha_1"] + inputs["alpha_0"]))
        assert d["fused"] == pytest.approx(100 * summary["curves"][f"{method}/fusion"]["accuracy"][0][mid])
        assert d["mixture"] == pytest.approx(100 * summary["curves"][f"{method}/mixture"]["accuracy"][0][mid], abs=5.1)
        assert d["barrier"] == pytest.approx(d["single"] - d["fused"])
        assert d["barrier"] == pytest.approx(d["averaging"] + d["misalignment"])
        assert len(row["diagnostics"][0]["single"][0]["correct"]) == config.eval_examples
    assert "| lora |" in (Path(config.output_dir) / "landscape.md").read_text().split("misalign.")[1]


def test_landscape_config_and_adapter_checks(model, folders, tmp_path):
    with pytest.raises(UserError, match="seeds"):
        landscape.LandscapeConfig(model=model, seeds=[0])
    with pytest.raises(UserError, match="alpha"):
        landscape.LandscapeConfig(model=model, alphas=[0.0, 1.5])
    with pytest.raises(UserError, match="merge_methods"):
        landscape.LandscapeConfig(model=model, merge_methods=["average"])
    with pytest.raises(UserError, match="overrides may not set 'task'"):
        landscape.LandscapeConfig(model=model, overrides={"task": "x"})
    assert landscape.LandscapeConfig(model=model, seeds=[3, 1, 2]).pairs() == [(3, 1), (1, 2)]
    wrong_task = landscape.LandscapeConfig(model=model, task="news_outlets", output_dir=str(tmp_path / "x"), **FAST)
    with pytest.raises(UserError, match="trained on task 'bbc_news'"):
        landscape.run_from_adapters({"lora": [folders["lora"]]}, wrong_task)
    assert not (tmp_path / "x").exists()


def test_landscape_takes_peft_merge_methods(land, folders, model, tmp_path):
    """A PEFT merger's point equals PEFT loading the folder `copra merge` writes for the same weights."""
    from peft import PeftModel
    from transformers import AutoModel

    from copra.models.text import PromptClassifier

    base, _ = land
    config = landscape.LandscapeConfig(
        model=model,
        seeds=[0, 1],
        alphas=[0.0, 0.3, 1.0],
        merge_methods=["ties", "cat"],
        align=False,
        merge_density=0.7,
        output_dir=str(tmp_path / "peft"),
        **FAST,
    )
    summary = landscape.run_from_adapters({"copra": [folders["copra"]]}, config)
    assert set(summary["curves"]) == {"copra/ties", "copra/cat"}
    inputs = summary["methods"]["copra"]["inputs"][0]
    cat = summary["curves"]["copra/cat"]["accuracy"][0]  # cat is exact: its ends are the inputs
    assert cat[-1] == pytest.approx(inputs["alpha_1"], abs=0.051) and cat[0] == pytest.approx(
        inputs["alpha_0"], abs=0.051
    )
    out = merge_folders(folders["copra"], "ties", [0.3, 0.7], density=0.7, output=tmp_path / "ties")
    encoder = PeftModel.from_pretrained(AutoModel.from_pretrained(model, add_pooling_layer=False), str(out))
    classifier, data = build_run(config.run_config("copra", 0))
    peft_classifier = PromptClassifier(encoder, classifier.tokenizer, max_length=16)
    peft_classifier.set_prompts(list(data.prompts))
    assert summary["curves"]["copra/ties"]["accuracy"][0][1] == pytest.approx(
        accuracy(peft_classifier, data.eval_x, data.eval_y), abs=0.051
    )
    with pytest.raises(UserError, match="density must be a number in"):
        landscape.LandscapeConfig(model=model, merge_methods=["dare_ties"], merge_density=0.0)


# ---- multitask (Table 1, MTL) -----------------------------------------------------------------


def test_multitask_table_and_merged_accuracy_on_each_task(model, tmp_path):
    config = multitask.MultitaskConfig(
        model=model, tasks=["bbc_news", "news_outlets"], seeds=[0], output_dir=str(tmp_path / "mtl"), **FAST
    )
    summary = multitask.run(config)
    saved = json.loads((tmp_path / "mtl" / "multitask.json").read_text())
    assert saved["tasks"] == ["bbc_news", "news_outlets"] and set(saved["methods"]) == {"lora", "copra"}
    assert saved["classifiers_built"] == 2  # one classifier, prompts switched per task; one rank-2r for mixtures
    for method, row in saved["methods"].items():
        run = row["runs"][0]
        assert set(run["original"]) == set(run["merged"]) == {"bbc_news", "news_outlets"}
        for task in config.tasks:
            assert run["original"][task] == pytest.approx(read_metadata(run["adapters"][task])["accuracy"])
            assert row["merged"][task]["mean"] == run["merged"][task] and row["merged"][task]["std"] == 0.0
        assert set(row["merged"]) == {"bbc_news", "news_outlets", "average"}
    # the merged accuracy on news_outlets, recomputed with a fresh classifier and that task's prompts
    run = summary["methods"]["copra"]["runs"][0]
    merged = fusion([load_adapter(run["adapters"][t])[0] for t in config.tasks])
    classifier, data = build_run(config.run_config("news_outlets", "copra", 0))
    assert run["merged"]["news_outlets"] == pytest.approx(state_accuracy(classifier, merged, data))
    table = (tmp_path / "mtl" / "multitask.md").read_text()
    assert "| | method | bbc_news | news_outlets | average |" in table
    for row in ("| origin | LoRA |", "| origin | CopRA |", "| merge | LoRA |", "| merge | CopRA |", "| zero-shot |"):
        assert row in table
    assert (tmp_path / "mtl" / "multitask.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="needs one adapter folder for each"):
        multitask.run_from_adapters({"lora": [{"bbc_news": run["adapters"]["bbc_news"]}]}, config)
    # merge_method: the same adapters merged by PEFT's TIES, scored through PEFT's own merged config
    from copra.adapters.peft_merge import peft_merge

    ties = multitask.MultitaskConfig(
        model=model,
        tasks=config.tasks,
        seeds=[0],
        merge_method="ties",
        merge_density=0.5,
        output_dir=str(tmp_path / "mtl-ties"),
        **FAST,
    )
    again = multitask.run_from_adapters({"copra": [run["adapters"]]}, ties)["methods"]["copra"]["runs"][0]
    assert again["original"] == run["original"]
    loaded = [load_adapter(run["adapters"][t]) for t in config.tasks]
    state, merged_config = peft_merge([s for s, _ in loaded], [c for _, c in loaded], "ties", density=0.5)
    assert merged_config["lora_alpha"] == merged_config["r"] and not merged_config["use_rslora"]
    classifier, data = build_run(ties.run_config("news_outlets", "copra", 0).replace(lora_alpha=2.0, use_rslora=False))
    assert again["merged"]["news_outlets"] == pytest.approx(state_accuracy(classifier, state, data))
    assert "equal-weight ties merge" in (tmp_path / "mtl-ties" / "multitask.md").read_text()
    with pytest.raises(UserError, match="tasks"):
        multitask.MultitaskConfig(model=model, tasks=["bbc_news"])


def test_multitask_diagnostics_split_the_fusion_and_pick_lambda_on_validation(model, tmp_path):
    config = multitask.MultitaskConfig(
        model=model,
        tasks=["bbc_news", "news_outlets"],
        seeds=[0, 1],
        methods=["lora"],
        scales=[1.0, 3.0],
        validation_examples=20,
        output_dir=str(tmp_path / "mtl"),
        **FAST,
    )
    row = multitask.run(config)["methods"]["lora"]
    d = row["diagnostics"]
    assert d["own"] == pytest.approx(100 * row["original"]["average"]["mean"])
    assert d["fused"] == pytest.approx(100 * row["merged"]["average"]["mean"])  # fusion at 1/2, not aligned
    assert d["barrier"] == pytest.approx(d["averaging"] + d["misalignment"])
    assert d["shrinkage"] == pytest.approx(d["own"] - d["fused_share"])
    for run in row["runs"]:
        diag = run["diagnostics"]
        assert diag["scale"] in (1.0, 3.0)
        for task, t in diag["tasks"].items():
            assert t["own"]["accuracy"] == pytest.approx(run["original"][task])
            if diag["scale"] == 1.0:
                assert t["scaled"] == t["fused"]
    # lambda is the grid point best on the validation sets (never the test split): recompute it
    from copra.adapters.merge import scale_update
    from copra.data.fewshot import prepare_shared_validation
    from copra.experiments.runner.common import Evaluator

    run = row["runs"][1]
    states = {t: load_adapter(run["adapters"][t]) for t in config.tasks}
    fused = fusion([states[t][0] for t in config.tasks])
    evaluator = Evaluator(config.run_config("bbc_news", "lora", 0))
    validation = {
        t: prepare_shared_validation([config.run_config(t, "lora", s) for s in config.seeds], 20) for t in config.tasks
    }
    score = {
        s: sum(evaluator.scored(scale_update(fused, s), states[t][1], validation[t]).accuracy for t in config.tasks)
        for s in config.scales
    }
    assert score[run["diagnostics"]["scale"]] == max(score.values())
    assert "| LoRA |" in (tmp_path / "mtl" / "multitask.md").read_text().split("misalign.")[1]
    with pytest.raises(UserError, match="scales must be positive"):
        multitask.MultitaskConfig(model=model, scales=[0.0])


def test_multitask_snapshot_curve_merges_every_snapshot(model, tmp_path):
    """Issue 12's crossover for MTL: each seed's task adapters at step t merged and scored, t = each snapshot."""
    from copra.report import crossover
    from copra.training.run_folder import SNAPSHOTS_DIR

    config = multitask.MultitaskConfig(
        model=model,
        tasks=["bbc_news", "news_outlets"],
        seeds=[0, 1],
        output_dir=str(tmp_path / "mtl"),
        snapshot_curve=True,
        **{**FAST, "overrides": {**FAST.get("overrides", {}), "snapshot_every": 2}},
    )
    summary = multitask.run(config)
    curve = summary["curve"]
    assert curve["steps"] == [2, 4, config.steps] and set(curve["merged"]) == {"lora", "copra"}
    run = summary["methods"]["copra"]["runs"][1]
    assert curve["merged"]["copra"][-1][1] == pytest.approx(sum(run["merged"].values()) / 2)  # the end: the table's
    at_2 = {t: load_adapter(Path(run["adapters"][t]).parent / SNAPSHOTS_DIR / "step-2")[0] for t in config.tasks}
    classifier, data = build_run(config.run_config("news_outlets", "copra", 1))
    on_outlets = state_accuracy(classifier, fusion([at_2[t] for t in config.tasks]), data)
    classifier, data = build_run(config.run_config("bbc_news", "copra", 1))
    on_bbc = state_accuracy(classifier, fusion([at_2[t] for t in config.tasks]), data)
    assert curve["merged"]["copra"][0][1] == pytest.approx((on_bbc + on_outlets) / 2)
    data = crossover.curves(json.loads((tmp_path / "mtl" / "multitask.json").read_text()))
    assert data["steps"] == [2, 4, config.steps] and len(data["merged"]) == 3 and not data["single"]
    with pytest.raises(UserError, match="snapshot_every"):
        multitask.MultitaskConfig(model=model, snapshot_curve=True)


# ---- merge_folders (`copra merge`) ------------------------------------------------------------


def expected_model(model_path, states, weights, adapter_config, rule):
    """The base encoder with W += s * dW written into its weights by hand (s = alpha/sqrt(r) or alpha/r)."""
    from transformers import AutoModel

    base = AutoModel.from_pretrained(model_path, add_pooling_layer=False).eval()
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    scale = alpha / math.sqrt(r) if adapter_config["use_rslora"] else alpha / r
    params = dict(base.named_parameters())
    with torch.no_grad():
        for prefix, a_key, b_key in module_pairs(states[0]):
            if rule == "fusion":
                b = sum(w * s[b_key] for w, s in zip(weights, states))
                delta = b @ sum(w * s[a_key] for w, s in zip(weights, states))
            else:
                delta = sum(w * s[b_key] @ s[a_key] for w, s in zip(weights, states))
            params[prefix.removeprefix("base_model.model.") + ".weight"] += scale * delta
    return base


def assert_peft_matches(model_path, folder, expected):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    base = AutoModel.from_pretrained(model_path, add_pooling_layer=False)
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    inputs = AutoTokenizer.from_pretrained(model_path)(
        ["the market said good news", "a film about music"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        got = peft_model(**inputs).last_hidden_state
        want = expected(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "method, weights, align", [("fusion", None, False), ("mixture", [0.3, 0.7], False), ("fusion", [0.5, 0.5], True)]
)
def test_merge_folders_loads_in_peft_with_expected_outputs(model, folders, tmp_path, method, weights, align):
    a, b = folders["copra"]
    out = merge_folders([a, b], method, weights, align, output=tmp_path / "merged", align_steps=20)
    (sa, config), (sb, _) = load_adapter(a), load_adapter(b)
    states = [sa, *align_many(sa, [sb], steps=20)] if align else [sa, sb]
    merged_config = json.loads((out / "adapter_config.json").read_text())
    assert merged_config["r"] == (4 if method == "mixture" else 2)
    assert load_file(str(out / "adapter_model.safetensors")).keys() == sa.keys()
    assert_peft_matches(model, out, expected_model(model, states, weights or [0.5, 0.5], config, method))
    meta = read_metadata(out)
    assert meta["method"] == method and meta["weights"] == (weights or [0.5, 0.5]) and len(meta["inputs"]) == 2
    if align:
        assert meta["bound_after_align"][0] <= meta["bound_before_align"][0]


def _no_output(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]  # no temporary folder left


def test_merge_folders_refuses_bad_inputs_without_output(folders, tmp_path):
    a, b = folders["lora"]
    out = tmp_path / "out"
    with pytest.raises(UserError, match="adapter folder not found: .*missing"):
        merge_folders([a, tmp_path / "missing"], output=out)
    with pytest.raises(UserError, match="got 3 merge weights for 2 adapters"):
        merge_folders([a, b], weights=[0.2, 0.3, 0.5], output=out)
    with pytest.raises(UserError, match="merge weight 1 is nan"):
        merge_folders([a, b], weights=[0.5, float("nan")], output=out)
    with pytest.raises(UserError, match="unknown merge method"):
        merge_folders([a, b], "average", output=out)
    with pytest.raises(UserError, match="at least two"):
        merge_folders([a], output=out)
    with pytest.raises(UserError, match="one of the input adapters"):
        merge_folders([a, b], output=b)
    rank4 = merge_folders([a, b], "mixture", output=tmp_path / "rank4")
    with pytest.raises(UserError, match=r"different rank.*adapter 1 = .*rank4"):
        merge_folders([a, rank4], output=out)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((Path(a) / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt/adapter_model.safetensors: not a readable"):
        merge_folders([a, corrupt], output=out)
    _no_output(tmp_path)
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        merge_folders([a, b], output=tmp_path / "exists")


def test_merge_cli_runs_merge(folders, tmp_path):
    a, b = folders["lora"]
    assert main(["merge", a, b, "--method", "mixture", "--weights", "0.25,0.75", "-o", str(tmp_path / "m")]) == 0
    assert read_metadata(tmp_path / "m")["weights"] == [0.25, 0.75]
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["lora_alpha"] == pytest.approx(
        math.sqrt(2)
    )
    assert main(["merge", a, "--weights", "1", "-o", str(tmp_path / "one")]) == 2
    assert not (tmp_path / "one").exists()


def test_prune_cli(folders, tmp_path):
    from copra.adapters.prune import sparsity_of

    a, _ = folders["copra"]
    assert main(["prune", a, "--sparsity", "0.5", "-o", str(tmp_path / "p")]) == 0
    state, _ = load_adapter(tmp_path / "p")
    assert sparsity_of(state) == pytest.approx(0.5, abs=0.01)
    assert read_metadata(tmp_path / "p")["sparsity"] == 0.5
    assert main(["prune", a, "--scheme", "every_other", "-o", str(tmp_path / "s")]) == 0
    state, _ = load_adapter(tmp_path / "s")
    assert all(not v.any() for k, v in state.items() if ".layer.1." in k)
    assert any(v.any() for k, v in state.items() if ".layer.0." in k)
    assert main(["prune", a, "--scheme", "diagonal", "-o", str(tmp_path / "bad")]) == 2
    assert main(["prune", a, "--sparsity", "1.0", "-o", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
