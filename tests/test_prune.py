"""copra.adapters.prune: structured and magnitude pruning of PEFT-keyed adapter state dicts."""

from __future__ import annotations

import math

import pytest
import torch

from copra.adapters.prune import (
    STRUCTURED,
    drop_layers,
    drop_projections,
    keep_projections,
    layer_ids,
    magnitude,
    projection_of,
    projections,
    sparsity_of,
    structured,
)
from copra.utils.errors import UserError

BERT = "base_model.model.encoder.layer"
BERT_MODULES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "output": "attention.output.dense",
    "ffn": "output.dense",
}
CLIP_MODULES = {
    "query": "self_attn.q_proj",
    "key": "self_attn.k_proj",
    "value": "self_attn.v_proj",
    "output": "self_attn.out_proj",
    "ffn": "mlp.fc1",
}


def make_adapter(towers, modules, seed=0):
    """towers: {block-list prefix: number of blocks}; blocks are inserted in string order (0, 1, 10, 11, 2...)."""
    g = torch.Generator().manual_seed(seed)
    adapter = {}
    for prefix, count in towers.items():
        for i in sorted(range(count), key=str):
            for module in modules.values():
                base = f"{prefix}.{i}.{module}"
                adapter[f"{base}.lora_A.weight"] = torch.randn(2, 8, generator=g)
                adapter[f"{base}.lora_B.weight"] = torch.randn(8, 2, generator=g)
    adapter["base_model.model.pooler.dense.lora_A.weight"] = torch.randn(2, 8, generator=g)  # no block
    adapter["base_model.model.pooler.dense.lora_B.weight"] = torch.randn(8, 2, generator=g)
    adapter["base_model.model.classifier.bias"] = torch.randn(3, generator=g)  # not LoRA
    return adapter


def bert(layers=6):
    return make_adapter({BERT: layers}, BERT_MODULES)


TEXT, VISION = "base_model.model.text_model.encoder.layers", "base_model.model.vision_model.encoder.layers"


def clip(text=12, vision=6):
    return make_adapter({TEXT: text, VISION: vision}, CLIP_MODULES)


def zeroed_blocks(before, after):
    """Block prefixes whose LoRA matrices are all zero after (and were not before)."""
    blocks = set()
    for block in layer_ids(before):
        keys = [k for k in after if k.startswith(block + ".") and ".lora_" in k]
        state = {bool((after[k] == 0).all()) for k in keys}
        assert len(state) == 1, f"block {block} is partly zeroed"
        if state == {True}:
            blocks.add(block)
    return blocks


def assert_same_layout(before, after):
    assert list(after) == list(before)
    for key in before:
        assert after[key].shape == before[key].shape and after[key].dtype == before[key].dtype
        assert after[key] is not before[key]


def test_layer_ids_numeric_within_each_tower():
    assert layer_ids(bert(12)) == [f"{BERT}.{i}" for i in range(12)]
    assert layer_ids(clip()) == [f"{TEXT}.{i}" for i in range(12)] + [f"{VISION}.{i}" for i in range(6)]
    assert layer_ids(
        {
            "transformer.h.1.attn.c_attn.lora_A.weight": torch.ones(1, 1),
            "transformer.h.0.attn.c_attn.lora_A.weight": torch.ones(1, 1),
        }
    ) == ["transformer.h.0", "transformer.h.1"]


@pytest.mark.parametrize("scheme", STRUCTURED)
def test_every_scheme_keeps_keys_shapes_and_the_input(scheme):
    for adapter in (bert(6), clip()):
        snapshot = {k: v.clone() for k, v in adapter.items()}
        out = structured(adapter, scheme)
        assert_same_layout(adapter, out)
        assert all(torch.equal(adapter[k], snapshot[k]) for k in adapter)  # input untouched
        assert torch.equal(out["base_model.model.classifier.bias"], adapter["base_model.model.classifier.bias"])
        for key in out:  # every tensor is either untouched or zero
            assert torch.equal(out[key], adapter[key]) or bool((out[key] == 0).all())


def test_all_changes_nothing():
    adapter = clip()
    out = structured(adapter, "all")
    assert all(torch.equal(out[k], adapter[k]) for k in adapter)


def test_every_other_zeroes_exactly_the_odd_blocks_of_each_tower():
    adapter = clip(text=12, vision=6)
    expected = {f"{TEXT}.{i}" for i in range(1, 12, 2)} | {f"{VISION}.{i}" for i in (1, 3, 5)}
    assert zeroed_blocks(adapter, structured(adapter, "every_other")) == expected


@pytest.mark.parametrize(
    "layers, kept",
    [
        (6, {"low": {0, 1}, "middle": {2, 3}, "high": {4, 5}}),
        (12, {"low": {0, 1, 2, 3}, "middle": {4, 5, 6, 7}, "high": {8, 9, 10, 11}}),
    ],
)
def test_thirds_keep_only_their_third(layers, kept):
    adapter = bert(layers)
    for scheme, keep in kept.items():
        out = structured(adapter, scheme)
        assert zeroed_blocks(adapter, out) == {f"{BERT}.{i}" for i in range(layers) if i not in keep}
        pooler = "base_model.model.pooler.dense.lora_A.weight"  # outside any block: not a player
        assert torch.equal(out[pooler], adapter[pooler])


def test_thirds_are_per_tower():
    adapter = clip(text=12, vision=6)
    out = structured(adapter, "high")
    kept = {f"{TEXT}.{i}" for i in range(8, 12)} | {f"{VISION}.{i}" for i in (4, 5)}
    assert zeroed_blocks(adapter, out) == set(layer_ids(adapter)) - kept


@pytest.mark.parametrize("adapter, modules", [(bert(3), BERT_MODULES), (clip(3, 2), CLIP_MODULES)])
@pytest.mark.parametrize("scheme", ["query", "key", "value", "output"])
def test_projection_schemes_keep_only_that_projection(adapter, modules, scheme):
    out = structured(adapter, scheme)
    for key in adapter:
        if ".lora_" not in key:
            continue
        kept = f".{modules[scheme]}.lora_" in key and ".layer" in key
        assert torch.equal(out[key], adapter[key]) if kept else bool((out[key] == 0).all()), key


def test_projection_names_and_aliases():
    assert projection_of(f"{BERT}.0.attention.output.dense") == "output"
    assert projection_of(f"{BERT}.0.output.dense") is None  # the FFN output is no attention projection
    assert projection_of("decoder.block.0.layer.0.SelfAttention.q") == "query"
    assert projections(bert(2)) == ["query", "key", "value", "output"]
    adapter = clip(2, 2)
    a, b = keep_projections(adapter, ["q_proj", "value"]), drop_projections(adapter, ["key", "output", "k_proj"])
    for key in adapter:
        if "lora_" in key and "layers" in key:
            assert torch.equal(a[key], b[key]) or ("mlp" in key and torch.equal(b[key], adapter[key]))


def test_drop_layers_by_index_and_name():
    adapter = clip(text=4, vision=3)
    assert zeroed_blocks(adapter, drop_layers(adapter, [0, -1])) == {
        f"{TEXT}.0",
        f"{TEXT}.3",
        f"{VISION}.0",
        f"{VISION}.2",
    }
    assert zeroed_blocks(adapter, drop_layers(adapter, [3])) == {f"{TEXT}.3"}  # vision has no 4th block
    assert zeroed_blocks(adapter, drop_layers(adapter, [f"{VISION}.1"])) == {f"{VISION}.1"}
    assert zeroed_blocks(adapter, drop_layers(adapter, [])) == set()
    for bad in ([4], ["encoder.layer.9"], [True], [1.5]):
        with pytest.raises(UserError):
            drop_layers(adapter, bad)


def test_bad_schemes_and_projections_are_user_errors():
    with pytest.raises(UserError, match="every_other"):
        structured(bert(), "odd")
    with pytest.raises(UserError, match="q_proj"):
        keep_projections(bert(), ["queries"])
    with pytest.raises(UserError, match="no \\['key'\\]"):
        structured(make_adapter({BERT: 2}, {"q": "attention.self.query"}), "key")
    with pytest.raises(UserError, match="lora_A"):
        structured({"classifier.weight": torch.ones(2)}, "all")
    with pytest.raises(UserError, match="layer index"):
        structured({"pooler.dense.lora_A.weight": torch.ones(2, 2)}, "low")


# -- magnitude ------------------------------------------------------------------------------------
def lora(adapter):
    return [k for k in adapter if ".lora_" in k]


def test_sparsity_zero_changes_nothing():
    adapter = bert(3)
    for scope in ("matrix", "global"):
        out = magnitude(adapter, 0.0, scope)
        assert_same_layout(adapter, out)
        assert all(torch.equal(out[k], adapter[k]) for k in adapter)
    assert sparsity_of(adapter) == 0.0


@pytest.mark.parametrize("sparsity", [0.1, 0.29, 0.5, 0.9, 0.99])
def test_matrix_scope_zeroes_the_exact_count_of_smallest_entries(sparsity):
    adapter = bert(3)
    snapshot = {k: v.clone() for k, v in adapter.items()}
    out = magnitude(adapter, sparsity)
    assert_same_layout(adapter, out)
    for key in lora(adapter):
        zero = out[key] == 0
        assert int(zero.sum()) == math.floor(round(sparsity * 100) * adapter[key].numel() / 100)
        assert torch.equal(out[key][~zero], adapter[key][~zero])
        if zero.any() and (~zero).any():
            assert adapter[key][zero].abs().max() <= adapter[key][~zero].abs().min()
    assert all(torch.equal(adapter[k], snapshot[k]) for k in adapter)
    total = sum(adapter[k].numel() for k in lora(adapter))
    assert sparsity_of(out) == pytest.approx(sum(int((out[k] == 0).sum()) for k in lora(adapter)) / total)


@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_global_scope_uses_one_threshold(sparsity):
    adapter = clip(3, 2)
    out = magnitude(adapter, sparsity, scope="global")
    keys = lora(adapter)
    total = sum(adapter[k].numel() for k in keys)
    zero = torch.cat([(out[k] == 0).reshape(-1) for k in keys])
    values = torch.cat([adapter[k].reshape(-1) for k in keys])
    assert int(zero.sum()) == math.floor(sparsity * total)
    assert values[zero].abs().max() <= values[~zero].abs().min()
    assert sparsity_of(out) == pytest.approx(math.floor(sparsity * total) / total)
    per_matrix = {int((out[k] == 0).sum()) for k in keys}
    assert len(per_matrix) > 1  # unlike scope="matrix", counts differ between matrices


def test_ties_are_broken_by_index():
    adapter = {"layer.0.q.lora_A.weight": torch.ones(2, 5), "layer.0.q.lora_B.weight": torch.ones(5, 2)}
    out = magnitude(adapter, 0.5)
    assert out["layer.0.q.lora_A.weight"].reshape(-1).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert torch.equal(magnitude(adapter, 0.5, "global")["layer.0.q.lora_B.weight"], torch.ones(5, 2))


def test_bad_sparsity_scope_and_values_are_user_errors():
    adapter = bert(2)
    for bad in (1.0, -0.1, float("nan"), "0.5", True):
        with pytest.raises(UserError, match="sparsity"):
            magnitude(adapter, bad)
    with pytest.raises(UserError, match="global"):
        magnitude(adapter, 0.5, scope="row")
    key = f"{BERT}.1.attention.self.key.lora_B.weight"
    broken = dict(adapter, **{key: torch.full((8, 2), float("inf"))})
    with pytest.raises(UserError, match="layer.1.attention.self.key"):
        magnitude(broken, 0.5)


# -- PEFT round trip ------------------------------------------------------------------------------
def test_pruned_adapters_load_into_peft(tiny_inputs):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from conftest import tiny_lora_bert

    model = tiny_lora_bert(layers=3)
    state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}  # it returns live views
    assert layer_ids(state) == [f"{BERT}.{i}" for i in range(3)]
    with torch.no_grad():
        lora_out = model(**tiny_inputs).last_hidden_state
        with model.disable_adapter():
            base_out = model(**tiny_inputs).last_hidden_state
    assert not torch.allclose(lora_out, base_out)

    for pruned in (structured(state, "every_other"), structured(state, "value"), magnitude(state, 0.5)):
        result = set_peft_model_state_dict(model, pruned)
        assert not result.unexpected_keys
        reloaded = get_peft_model_state_dict(model)
        assert all(torch.equal(reloaded[k], pruned[k]) for k in pruned)

    set_peft_model_state_dict(model, drop_layers(state, range(3)))
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny_inputs).last_hidden_state, base_out)
    set_peft_model_state_dict(model, state)
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny_inputs).last_hidden_state, lora_out)
