"""CopRA on PEFT's DoRA (LoraConfig(use_dora=True)): a gated-off DoRA module runs its base layer only.

DoRA adds a learned magnitude vector per module (`lora_magnitude_vector`); gating goes through PEFT's
public `enable_adapters` (copra.utils.compat), which must cover it exactly as it covers A and B.
"""

from __future__ import annotations

import pytest
import torch

from copra import CopRA

from conftest import tiny_lora_bert, tiny_run_config


def tiny_dora_bert(layers: int = 3, seed: int = 0):
    """A tiny BERT with DoRA on q/k/v; B random (not zero) so the adapters change the output."""
    return tiny_lora_bert(layers, seed, use_dora=True)


def _hidden(model, inputs):
    return model(**inputs).last_hidden_state


@pytest.mark.parametrize("granularity, on", [("layer", ".layer.1."), ("module", ".layer.1.attention.self.key.")])
def test_gated_off_dora_parameters_get_no_grad_and_do_not_move(tiny_inputs, granularity, on):
    model = tiny_dora_bert().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    gates = CopRA(model, total_steps=10, granularity=granularity)
    _hidden(model, tiny_inputs).pow(2).mean().backward()  # a full step first: AdamW has momentum everywhere
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum("lora_magnitude_vector" in n for n in trainable) == 9
    before = {n: p.detach().clone() for n, p in trainable.items()}
    gates.set_active([on in f".{player}." for player in gates.players])
    assert sum(gates.mask) == 1
    _hidden(model, tiny_inputs).pow(2).mean().backward()
    for name, param in trainable.items():
        if on in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    optimizer.step()
    for name, param in trainable.items():
        assert (not torch.equal(param, before[name])) == (on in name), name
    # the switch left PEFT's state and the requires_grad flags as they were
    assert all(p.requires_grad for p in trainable.values())
    assert all(
        not m.disable_adapters
        for _, m in __import__("copra.core.gates", fromlist=["lora_modules"]).lora_modules(model)
    )


def test_use_dora_reaches_peft_and_trains_with_copra(tiny_text_model, tmp_path):
    from copra.adapters.io import load_adapter
    from copra.experiments.runner.common import Evaluator
    from copra.models.evaluation import prepare_data
    from copra.models.lora import lora_config
    from copra.training.loop import train

    config = tiny_run_config(tiny_text_model, method="copra", use_dora=True, steps=3)
    assert lora_config(config).use_dora and not lora_config(config.replace(use_dora=False)).use_dora
    result = train(config, output_dir=tmp_path / "run")
    state, adapter_config = load_adapter(result.adapter_dir)
    assert adapter_config["use_dora"] is True
    assert sum("lora_magnitude_vector" in k for k in state) == 9  # 3 blocks x q/k/v
    # the merging / pruning evaluator rebuilds a DoRA classifier from adapter_config and agrees with training
    accuracy = Evaluator(config).accuracy(state, adapter_config, prepare_data(config))
    assert accuracy == pytest.approx(result.accuracy, abs=1e-6)


def test_dora_sweep_variant_validates():
    from copra.experiments.sweep import VARIANT_SETS, SweepConfig

    config = SweepConfig(variants="dora", grid={}, seeds=[0, 1])
    assert config.variants["CopRA on DoRA"] == {"method": "copra", "use_dora": True}
    assert config.run_config("CopRA on DoRA", {}, 0).use_dora
    assert set(VARIANT_SETS["dora"]) == {"LoRA", "CopRA", "DoRA", "CopRA on DoRA"}
