"""CopRA's gates on PEFT LoRA: grouping, sampling, skipping, gradients, eval mode.

These tests also pin the PEFT behaviour copra relies on (a LoRA layer with an empty active-adapter
list runs only its base layer), so a PEFT upgrade that breaks it fails here.
"""

import math

import pytest
import torch

from copra import CopRA
from copra.core.gates import player_of
from copra.utils.errors import UserError

from conftest import tiny_bert, tiny_lora_bert


def _hidden(model, inputs):
    return model(**inputs).last_hidden_state


def test_layer_players_in_model_order():
    model = tiny_lora_bert(layers=3)
    gates = CopRA(model, total_steps=10)
    assert gates.players == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    module_gates = CopRA(model, total_steps=10, granularity="module")
    assert len(module_gates.players) == 9
    assert module_gates.players[:3] == [f"encoder.layer.0.attention.self.{m}" for m in ("query", "key", "value")]


@pytest.mark.parametrize(
    "name, player",
    [
        ("encoder.layer.3.attention.self.query", "encoder.layer.3"),
        ("text_model.encoder.layers.11.self_attn.q_proj", "text_model.encoder.layers.11"),
        ("transformer.h.0.attn.c_attn", "transformer.h.0"),
        ("blocks.2.attn.qkv", "blocks.2"),
        ("pooler.dense", "pooler.dense"),  # not in a block: its own player
    ],
)
def test_player_of(name, player):
    assert player_of(name) == player


def test_clip_towers_are_separate_players():
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=8,
    )
    model = get_peft_model(CLIPModel(config), LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"]))
    gates = CopRA(model, total_steps=5)
    assert gates.players == [f"text_model.encoder.layers.{i}" for i in range(2)] + [
        f"vision_model.encoder.layers.{i}" for i in range(3)
    ]


def test_model_without_lora_is_a_clear_error():
    with pytest.raises(UserError, match="no PEFT LoRA modules"):
        CopRA(tiny_bert(), total_steps=10)


def test_a_gate_schedule_or_its_fields_draw_the_same_gates():
    from copra.core.schedule import GateSchedule

    model = tiny_lora_bert(layers=3)
    schedule = GateSchedule(20, initial_p=0.3, ramp="sine")
    gates = CopRA(model, schedule, seed=5)
    assert gates.schedule is schedule and gates.total_steps == 20
    masks = [gates.step(t) for t in range(20)]
    gates.remove()
    keyword_gates = CopRA(model, total_steps=20, initial_p=0.3, ramp="sine", seed=5)
    assert keyword_gates.schedule == schedule and [keyword_gates.step(t) for t in range(20)] == masks
    keyword_gates.remove()
    with pytest.raises(TypeError):
        CopRA(model, 20, 0.3)  # only the schedule (or total_steps) is positional


@pytest.mark.parametrize("bad", [dict(total_steps=0), dict(initial_p=2.0), dict(granularity="head")])
def test_bad_controller_arguments(bad):
    with pytest.raises(UserError):
        CopRA(tiny_lora_bert(), **({"total_steps": 10} | bad))


@pytest.mark.parametrize("use_dora", [False, True])
def test_all_on_equals_plain_lora_and_all_off_equals_base(tiny_inputs, use_dora):
    """LoRA and DoRA alike (DoRA's magnitude vector must be switched off with A and B)."""
    model = tiny_lora_bert(layers=3, use_dora=use_dora).train()
    assert use_dora == any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    plain = _hidden(model, tiny_inputs)
    with model.disable_adapter():
        base = _hidden(model, tiny_inputs)
    assert not torch.allclose(plain, base)  # the adapters do something
    gates = CopRA(model, total_steps=10)
    gates.step(9)  # p = 1: every player on
    assert torch.equal(_hidden(model, tiny_inputs), plain)
    with gates.active([False, False, False]):
        assert torch.equal(_hidden(model, tiny_inputs), base)
    gates.remove()
    assert torch.equal(_hidden(model, tiny_inputs), plain)


def test_off_player_skips_lora_compute(tiny_inputs):
    model = tiny_lora_bert(layers=3).train()
    calls = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    gates = CopRA(model, total_steps=10)
    gates.set_active([True, False, True])
    _hidden(model, tiny_inputs)
    assert len(calls) == 6 and not any(".layer.1." in c for c in calls)
    # PEFT's own state is untouched outside the forward
    assert all(
        m.active_adapters == ["default"]
        for _, m in __import__("copra.core.gates", fromlist=["lora_modules"]).lora_modules(model)
    )


def test_gated_off_adapters_get_no_grad_and_do_not_move(tiny_inputs):
    model = tiny_lora_bert(layers=3).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    gates = CopRA(model, total_steps=10)
    # one full step first so AdamW has momentum for every parameter
    _hidden(model, tiny_inputs).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gates.set_active([False, True, False])
    _hidden(model, tiny_inputs).pow(2).mean().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            if ".layer.1." in name:
                assert param.grad is not None and param.grad.abs().sum() > 0, name
            else:
                assert param.grad is None, name
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            moved = not torch.equal(param, before[name])
            assert moved == (".layer.1." in name), name


def test_eval_mode_is_all_on_unless_explicit(tiny_inputs):
    model = tiny_lora_bert(layers=3)
    gates = CopRA(model, total_steps=100, seed=3)
    model.eval()
    plain = _hidden(model, tiny_inputs)
    mask = gates.step(1)  # p tiny: few players on
    assert not all(mask)
    assert torch.equal(_hidden(model, tiny_inputs), plain)  # eval: drawn gates do not apply
    model.train()
    assert not torch.equal(_hidden(model, tiny_inputs), plain)  # train: they do
    model.eval()
    with gates.active([False] * 3):
        with model.disable_adapter():
            base = _hidden(model, tiny_inputs)
        assert torch.equal(_hidden(model, tiny_inputs), base)  # explicit mask applies in eval
    assert torch.equal(_hidden(model, tiny_inputs), plain)  # restored afterwards


def test_context_manager_restores_previous_state():
    gates = CopRA(tiny_lora_bert(layers=3), total_steps=10)
    gates.set_active([True, False, True])
    with gates.active(["encoder.layer.1"]):
        assert gates.mask == [False, True, False]
    assert gates.mask == [True, False, True]
    gates.all_on()
    assert gates.mask == [True] * 3
    with pytest.raises(UserError, match="unknown player"):
        gates.set_active(["encoder.layer.9"])
    with pytest.raises(UserError, match="3 players"):
        gates.set_active([True])


def test_steps_are_seeded_and_never_empty():
    model = tiny_lora_bert(layers=3)
    gates = CopRA(model, total_steps=50, seed=7, granularity="module")
    masks_a = [gates.step(t) for t in range(50)]
    gates.remove()
    same_seed_gates = CopRA(model, total_steps=50, seed=7, granularity="module")
    assert [same_seed_gates.step(t) for t in range(50)] == masks_a
    same_seed_gates.remove()
    other_seed_gates = CopRA(model, total_steps=50, seed=8, granularity="module")
    assert [other_seed_gates.step(t) for t in range(50)] != masks_a
    assert all(any(m) for m in masks_a)
    assert sum(masks_a[0]) == 1  # p = 0: exactly one player, the limit of redrawing
    assert all(all(m) for m in masks_a[38:])  # p = 1 after 3T/4 (ceil(37.5) = 38)
    # resumed gates draw the same mask for the same step
    resumed_gates = CopRA(model, total_steps=50, seed=7, granularity="module")
    assert resumed_gates.step(20) == masks_a[20]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_empirical_keep_rate_follows_p(p):
    gates = CopRA(tiny_lora_bert(layers=3), total_steps=10, granularity="module")  # 9 players
    n, draws = len(gates.players), 4000
    rate = sum(sum(gates.draw(p)) for _ in range(draws)) / (n * draws)
    expected = p / (1 - (1 - p) ** n)  # Bernoulli(p) conditioned on at least one player on
    sigma = math.sqrt(expected * (1 - expected) / (n * draws))
    assert abs(rate - expected) < 5 * sigma + 1e-3


def test_keep_rate_over_a_schedule_follows_p_t():
    gates = CopRA(tiny_lora_bert(layers=3), total_steps=400, granularity="module")
    n = len(gates.players)
    rates = [sum(gates.step(t)) / n for t in range(400)]
    expected = [
        gates.probability(t) / (1 - (1 - gates.probability(t)) ** n) if gates.probability(t) > 0 else 1 / n
        for t in range(400)
    ]
    # averaged over windows of 50 steps the rate tracks p(t)
    for start in range(0, 400, 50):
        got, want = sum(rates[start : start + 50]) / 50, sum(expected[start : start + 50]) / 50
        assert abs(got - want) < 0.08, (start, got, want)
