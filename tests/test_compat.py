"""copra.utils.compat: every path that is picked at run time by library version is run here."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from copra.core.gates import lora_modules
from copra.models.layer_runner import LayerRunner
from copra.utils import compat

from conftest import tiny_bert, tiny_lora_bert


def padded_batch():
    torch.manual_seed(5)
    ids = torch.randint(1, 64, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    return ids, mask


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("builder", ["bidirectional_mask_builder", "legacy_mask_builder"])
def test_each_mask_builder_matches_the_models_own_forward(builder, attention):
    model = tiny_bert(attention=attention)
    assert model.config._attn_implementation == attention
    build = getattr(compat, builder)(model)
    if build is None:
        pytest.skip(f"{builder} has no API in this transformers")
    runner = LayerRunner(model)
    runner._mask_fn = build
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = runner(ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)


def test_the_runner_prefers_the_public_bidirectional_mask():
    model = tiny_bert()
    if compat.bidirectional_mask_builder(model) is None:
        pytest.skip("transformers < 4.56 has no create_bidirectional_mask")
    hidden = torch.zeros(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(
        torch.as_tensor(LayerRunner(model)._mask_fn(hidden, mask)),
        torch.as_tensor(compat.bidirectional_mask_builder(model)(hidden, mask)),
    )


def test_switching_adapters_off_runs_the_base_layer_and_restores_flags():
    model = tiny_lora_bert()
    ids, mask = padded_batch()
    _, module = lora_modules(model)[0]
    module.lora_A["default"].weight.requires_grad_(False)  # a frozen adapter must stay frozen
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    x = torch.randn(2, 16)
    compat.switch_adapters_off(module)
    off = module(x)
    assert module.disable_adapters
    compat.switch_adapters_on(module)
    torch.testing.assert_close(off, module.base_layer(x))
    assert not module.disable_adapters
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags
    assert not torch.allclose(module(x), off)  # the adapter is on again


def test_switching_leaves_a_layer_the_user_disabled_alone():
    _, module = lora_modules(tiny_lora_bert())[0]
    module.enable_adapters(False)
    compat.switch_adapters_off(module)
    compat.switch_adapters_on(module)
    assert module.disable_adapters


def test_memoized_forward_reuses_only_the_same_unchanged_tensor():
    layer = torch.nn.Linear(4, 4)
    calls = []
    layer.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 4)
    with compat.memoized_forward([layer]):
        first = layer(x)
        assert layer(x) is first
        x.add_(1.0)  # an in-place change invalidates
        assert layer(x) is not first
        assert layer(x.clone()) is not None
        assert len(calls) == 4  # hooks still run; the Linear's forward ran three times
    assert "forward" not in vars(layer)


def test_checkpoint_file_finds_a_local_file_and_says_none_otherwise(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5]}))
    assert compat.checkpoint_file(str(tmp_path), "preprocessor_config.json") == str(
        tmp_path / "preprocessor_config.json"
    )
    assert compat.checkpoint_file(str(tmp_path), "missing.json") is None


def test_quiet_known_warnings_hides_exactly_the_listed_ones():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.quiet_known_warnings()
        for message, category in compat.KNOWN_WARNINGS:
            warnings.warn(message + " (in a test)", category)
        warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else"]


def test_fold_rslora_scaling_gives_the_update_add_weighted_adapter_folds_in():
    model = tiny_lora_bert()  # rsLoRA, r=2
    model.add_weighted_adapter(["default"], [1.0], "same", combination_type="linear")  # must equal "default"
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    before = layer.get_delta_weight("same")
    assert compat.fold_rslora_scaling(model, "same")
    want = layer.get_delta_weight("default")
    torch.testing.assert_close(layer.get_delta_weight("same"), want)
    if not torch.allclose(before, want):  # this PEFT has the sqrt(r) overscaling (peft#3449)
        torch.testing.assert_close(before, want * 2**0.5)
    assert model.peft_config["same"].use_rslora is False and not compat.fold_rslora_scaling(model, "same")


def test_supported_attention_falls_back_to_eager_where_an_architecture_has_no_sdpa(tiny_text_model, tmp_path):
    from tests.test_embedded_models import tiny_mpnet_folder

    mpnet = tiny_mpnet_folder(tmp_path / "mpnet")
    assert compat.supported_attention(tiny_text_model, "sdpa") == "sdpa"  # BERT has it
    assert compat.supported_attention(str(mpnet), "sdpa") == "eager"
    assert compat.supported_attention(str(mpnet), "eager") == "eager"
    assert compat.supported_attention(str(tmp_path / "missing"), "sdpa") == "sdpa"  # from_pretrained reports it
