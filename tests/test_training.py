"""The training loop end to end on a tiny encoder (fast) and on the real embedded MiniLM (one test)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from copra.models.evaluation import accuracy, adapter_state, load_adapter_state, state_accuracy
from copra.training.loop import build_run, train

from conftest import tiny_run_config


def test_tiny_copra_run_writes_peft_adapter_and_metadata(tiny_text_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    config = tiny_run_config(tiny_text_model, method="copra", steps=8, save_early=True)
    result = train(config, output_dir=tmp_path / "run")
    assert 0.0 <= result.accuracy <= 1.0 and result.seconds_per_step > 0
    assert result.mean_active_fraction < 1.0  # some layers were gated off early on
    folder = tmp_path / "run" / "adapter"
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    meta = json.loads((folder / "copra.json").read_text())
    assert meta["method"] == "copra" and meta["task"] == "bbc_news" and meta["seed"] == 0 and meta["steps"] == 8
    assert meta["schedule"]["ramp_fraction"] == 0.75 and meta["accuracy"] == pytest.approx(result.accuracy)
    assert (tmp_path / "run" / "early" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "early" / "copra.json").read_text())["at_step"] == 2

    # PEFT loads it unchanged and gives identical outputs
    classifier, data = build_run(config)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    ours = state_accuracy(classifier, saved, data)
    assert ours == pytest.approx(result.accuracy)
    peft_model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(tiny_text_model, add_pooling_layer=False), str(folder)
    ).eval()
    exact, _ = build_run(config.replace(precision="fp32"))  # fp32 like the PEFT model (training ran in `auto`)
    load_adapter_state(exact, saved)
    inputs = exact.inputs_for(["the market said good news", "a film about music"])
    exact.eval()
    with torch.no_grad():
        assert torch.allclose(
            peft_model(**inputs).last_hidden_state, exact.encoder(**inputs).last_hidden_state, atol=1e-6
        )


def test_same_seed_same_adapter_and_lora_vs_copra_differ(tiny_text_model):
    a = train(tiny_run_config(tiny_text_model, method="copra"))
    b = train(tiny_run_config(tiny_text_model, method="copra"))
    assert a.final_loss == b.final_loss and a.accuracy == b.accuracy
    c = train(tiny_run_config(tiny_text_model, method="lora"))
    assert c.final_loss != a.final_loss


@pytest.mark.real_model
def test_real_minilm_trains_and_beats_nothing_learned(tmp_path):
    """The pretrained embedded encoder: zero-shot is far above chance and a short CopRA run keeps it sane."""
    from copra.core.config import make_config

    config = make_config(
        dict(task="bbc_news", method="copra", shots=4, steps=6, batch_size=8, eval_examples=60, progress=False)
    )
    classifier, data = build_run(config)
    zero_shot = accuracy(classifier, data.eval_x, data.eval_y)
    assert zero_shot > 0.5  # 5 classes: chance is 0.2; the real pretrained encoder knows news topics
    before = adapter_state(classifier)
    result = train(config, data=data, output_dir=tmp_path / "run")
    assert result.accuracy > 0.5
    from copra.adapters.io import load_adapter

    state, adapter_config = load_adapter(tmp_path / "run" / "adapter")
    assert adapter_config["r"] == 2 and adapter_config["use_rslora"] is True
    assert state.keys() == before.keys()
    assert any(not torch.equal(state[k], before[k]) for k in state)  # the adapter was trained


def test_result_json_records_the_plateau_test(tiny_text_model, tmp_path, monkeypatch):
    from copra.analysis import stats
    from copra.training import loop as training

    result = train(tiny_run_config(tiny_text_model, method="copra", steps=10), output_dir=tmp_path / "flat")
    saved = json.loads((tmp_path / "flat" / "result.json").read_text())
    expected = stats.plateau(result.losses)  # the tiny random encoder learns next to nothing: a flat loss
    assert saved["converged"] is expected.converged is True and saved["plateau"]["window"] == 5
    assert saved["plateau"]["improvement"] == pytest.approx(expected.improvement)
    # a run the test judges not converged (a threshold no curve passes) is marked so in result.json
    monkeypatch.setattr(training, "plateau", lambda losses: stats.plateau(losses, threshold=-1.0, floor=0.0))
    train(tiny_run_config(tiny_text_model, method="lora", steps=10), output_dir=tmp_path / "falling")
    saved = json.loads((tmp_path / "falling" / "result.json").read_text())
    assert saved["converged"] is False and saved["plateau"]["threshold"] == -1.0
    short = train(tiny_run_config(tiny_text_model, method="lora", steps=4))
    assert short.converged is None  # shorter than two windows: not tested


def test_the_lr_schedule_reaches_the_optimizer(monkeypatch, tiny_text_model):
    """hold_then_cosine trains at the peak lr until the ramp ends, then decays (TrainConfig.lr_schedule)."""

    seen = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(
        torch.optim.AdamW,
        "step",
        lambda self, *a, **k: seen.append(self.param_groups[0]["lr"]) or real_step(self, *a, **k),
    )
    train(tiny_run_config(tiny_text_model, lr_schedule="hold_then_cosine", steps=8, lr=0.01, min_lr=0.0))
    assert seen[:6] == [0.01] * 6 and seen[7] == pytest.approx(0.0)
    seen.clear()
    train(tiny_run_config(tiny_text_model, steps=8, lr=0.01, min_lr=0.0))
    assert seen[0] == 0.01 and 0 < seen[3] < 0.01  # the paper's cosine decays from the first step
