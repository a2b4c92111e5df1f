"""PEFT's merge methods through copra: the same result as add_weighted_adapter on a real model."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from copra.adapters.io import load_adapter
from copra.adapters.ops import merge_folders
from copra.adapters.peft_merge import DENSITY_METHODS, PEFT_METHODS, SIGN_METHODS, merge_states, peft_merge, skeleton
from copra.cli import main

from conftest import tiny_bert

TARGETS = ["query", "value"]  # model order = the skeleton's natural order, so DARE's draws line up


def two_adapters(rslora: bool = False, rank: int = 2, seed: int = 0):
    """A tiny BERT holding adapters "one" and "two" with random (non-zero) A and B."""
    base = tiny_bert(layers=2, seed=seed)
    config = LoraConfig(r=rank, lora_alpha=3, target_modules=TARGETS, init_lora_weights=False, use_rslora=rslora)
    torch.manual_seed(seed + 1)
    model = get_peft_model(base, config, adapter_name="one")
    model.add_adapter("two", config)
    return model


def save_each(model, folder):
    model.save_pretrained(str(folder))  # "one" goes to folder/one, "two" to folder/two
    return [folder / "one", folder / "two"]


def deltas(model, name):
    """Module path -> effective update (B A scaling) of adapter `name`."""
    return {
        n: m.get_delta_weight(name).detach()
        for n, m in model.named_modules()
        if hasattr(m, "get_delta_weight") and name in getattr(m, "lora_A", {})
    }


def loaded_deltas(base, folder):
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    return deltas(model, "default")


def options(method):
    return dict(
        density=0.6 if method in DENSITY_METHODS else None,
        majority_sign_method="frequency" if method in SIGN_METHODS else None,
    )


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_each_method_equals_peft_on_the_full_model(tmp_path, method):
    model = two_adapters()
    folders = save_each(model, tmp_path)
    weights, opts = [0.7, -0.2], options(method)
    torch.manual_seed(11)  # what copra does inside, for DARE's random drops
    model.add_weighted_adapter(
        ["one", "two"],
        weights,
        "peft",
        combination_type=method,
        density=opts["density"],
        majority_sign_method=opts["majority_sign_method"] or "total",
    )
    want = deltas(model, "peft")
    out = merge_folders(folders, method, weights, output=tmp_path / "merged", seed=11, **opts)
    got = loaded_deltas(tiny_bert(layers=2, seed=0), out)
    assert len(got) == len(want) == 4
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "copra.json").read_text())["peft"]["combination_type"] == method


@pytest.mark.parametrize("method", ["linear", "cat", "svd", "ties", "dare_linear"])
def test_rslora_inputs_give_the_update_peft_folds_in(tmp_path, method):
    """PEFT <= 0.21.2 leaves rsLoRA on for the merged adapter (sqrt(r) too large); copra's has scaling 1."""
    model = two_adapters(rslora=True, rank=4)
    folders = save_each(model, tmp_path)
    opts = options(method) | ({"density": 1.0} if method in DENSITY_METHODS else {})
    torch.manual_seed(0)
    model.add_weighted_adapter(
        ["one", "two"], [1.0, 0.0], "peft", combination_type=method, **{k: v for k, v in opts.items() if v is not None}
    )
    out = merge_folders(folders, method, [1.0, 0.0], output=tmp_path / "merged", **opts)
    got = loaded_deltas(tiny_bert(layers=2, seed=0), out)
    single = deltas(model, "one")  # weights (1, 0): the merge is adapter one itself
    for name, module in model.named_modules():
        if name in got:
            factors = module.lora_B["peft"].weight @ module.lora_A["peft"].weight  # PEFT's merge at scaling 1
            torch.testing.assert_close(got[name], factors.detach(), rtol=1e-5, atol=1e-6)
            if method != "ties":  # TIES elects signs and divides by the agreeing count: not an identity
                torch.testing.assert_close(got[name], single[name], rtol=1e-4, atol=1e-5)
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is False


def test_cat_takes_different_ranks_and_is_the_exact_weighted_sum(tmp_path):
    small, big = two_adapters(rank=2), two_adapters(rank=3, seed=5)
    small.save_pretrained(str(tmp_path / "s"), selected_adapters=["one"])
    big.save_pretrained(str(tmp_path / "g"), selected_adapters=["one"])
    folders = [tmp_path / "s" / "one", tmp_path / "g" / "one"]
    out = merge_folders(folders, "cat", [0.5, 2.0], output=tmp_path / "cat")
    got, d1, d2 = loaded_deltas(tiny_bert(layers=2), out), deltas(small, "one"), deltas(big, "one")
    for name in got:
        torch.testing.assert_close(got[name], 0.5 * d1[name] + 2.0 * d2[name], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 5
    with pytest.raises(Exception, match="needs equal ranks"):
        merge_folders(folders, "ties", density=0.5, output=tmp_path / "ties")
    assert not (tmp_path / "ties").exists()


def test_merge_states_keeps_copra_fusion_and_the_global_rng():
    model = two_adapters()
    from peft import get_peft_model_state_dict

    states = [get_peft_model_state_dict(model, adapter_name=n) for n in ("one", "two")]
    configs = [
        {**model.peft_config[n].to_dict(), "target_modules": TARGETS, "peft_type": "LORA"} for n in ("one", "two")
    ]
    from copra.adapters.merge import fusion

    state, config = merge_states("fusion", states, configs, [0.5, 0.5])
    assert config == configs[0] and all(torch.equal(state[k], v) for k, v in fusion(states).items())
    before = torch.get_rng_state()
    first = peft_merge(states, configs, "dare_ties", density=0.5, seed=3)[0]
    assert torch.equal(torch.get_rng_state(), before)  # DARE drew from a forked generator
    again = peft_merge(states, configs, "dare_ties", density=0.5, seed=3)[0]
    other = peft_merge(states, configs, "dare_ties", density=0.5, seed=4)[0]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_skeleton_holds_no_base_weights():
    root = skeleton({"enc.layer.10.q": (6, 4), "enc.layer.2.q": (6, 4)})
    weight = root.get_submodule("enc.layer.2.q").weight
    assert weight.shape == (4, 6) and weight.stride() == (0, 0)
    linears = [n for n, m in root.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears == ["enc.layer.2.q", "enc.layer.10.q"]  # natural order, as a model lists its layers


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "ties", "--density", "1.5"], "density must be a number in (0, 1]"),
        (["--method", "dare_linear", "--density", "0"], "density must be a number in (0, 1]"),
        (["--method", "ties"], "needs a density in (0, 1]"),
        (["--method", "linear", "--density", "0.5"], "density applies only to"),
        (["--method", "fusion", "--density", "0.5"], "apply to PEFT's methods"),
        (["--method", "svd", "--majority-sign-method", "total"], "majority sign method applies only to"),
        (["--method", "linear", "--weights", "1,2,3"], "got 3 merge weights for 2 adapters"),
        (["--method", "ties_dare"], "invalid choice: 'ties_dare'"),
        (["--method", "ties", "--density", "0.5", "--majority-sign-method", "most"], "invalid choice: 'most'"),
    ],
)
def test_bad_merge_options_are_one_line_and_write_nothing(capsys, tmp_path, extra, message):
    folders = save_each(two_adapters(), tmp_path)
    out = tmp_path / "merged"
    code = main(["merge", *map(str, folders), "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_cli_writes_a_peft_folder(capsys, tmp_path):
    folders = save_each(two_adapters(), tmp_path)
    code = main(
        [
            "merge",
            *map(str, folders),
            "--method",
            "ties_svd",
            "--density",
            "0.5",
            "--weights",
            "1,1",
            "-o",
            str(tmp_path / "m"),
        ]
    )
    assert code == 0 and "ties_svd of 2 adapters" in capsys.readouterr().out
    state, config = load_adapter(tmp_path / "m")
    assert config["r"] == config["lora_alpha"] == 2 and len(state) == 8


@pytest.mark.parametrize("method", ["linear", "svd", "dare_ties_svd"])
def test_gpt2_conv1d_adapters_merge_like_peft(tmp_path, method):
    """fan_in_fan_out (GPT-2's Conv1D): the skeleton's nn.Linear gives PEFT's factors, the config keeps the flag."""
    from transformers import GPT2Config, GPT2Model

    def base():
        torch.manual_seed(0)
        return GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16))

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(base(), config, adapter_name="one")
    model.add_adapter("two", config)
    folders = save_each(model, tmp_path)
    torch.manual_seed(5)
    model.add_weighted_adapter(
        ["one", "two"],
        [0.6, 0.4],
        "peft",
        combination_type=method,
        **({"density": 0.5} if method in DENSITY_METHODS else {}),
    )
    out = merge_folders(
        folders,
        method,
        [0.6, 0.4],
        output=tmp_path / "m",
        seed=5,
        **({"density": 0.5} if method in DENSITY_METHODS else {}),
    )
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    got, want = loaded_deltas(base(), out), deltas(model, "peft")
    assert len(got) == 2
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
