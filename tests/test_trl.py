"""CopRACallback inside TRL's SFTTrainer: a tiny random Llama, PEFT LoRA, prompt/completion data, CPU.

The gates must follow p(t) through TRL's loop (its gradient checkpointing included), a gated-off
block's adapters must get no gradient and not move in that step, and the saved adapter must load in
plain PEFT with the outputs the trainer's model gives."""

from __future__ import annotations

import math

import pytest
import torch
from causal_models import save_tiny_tokenizer, tiny_llama
from peft import LoraConfig, PeftModel
from transformers import TrainerCallback

from copra import CopRACallback
from copra.core.gates import lora_modules

pytest.importorskip("trl")  # an optional extra (llm); SFTTrainer is imported in the fixture

STEPS, LAYERS = 8, 3
PROMPTS = [
    ("the match ended two nil", " sport"),
    ("shares fell in early trade", " business"),
    ("the new phone has a faster chip", " tech"),
    ("the striker signed a new deal", " sport"),
    ("the bank raised its rates", " business"),
    ("an update fixes the battery bug", " tech"),
]


class _Recorder(TrainerCallback):
    """Per optimizer step: which LoRA parameters got a gradient, and their values after the update."""

    def __init__(self):
        self.with_grad: list[set[str]] = []
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.before = _lora_params(model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.with_grad.append({n for n, p in _named_lora(self.model) if p.grad is not None})

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append(_lora_params(self.model))


def _named_lora(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


def _lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in _named_lora(model)}


def _owners(trainer, gates) -> dict[str, int]:
    """LoRA parameter name -> index of the CopRA player (decoder block) whose gate switches it."""
    player = {id(p): i for i in range(len(gates.players)) for m in gates.modules_of(i) for p in m.parameters()}
    return {n: player[id(p)] for n, p in _named_lora(trainer.model)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    folder = tmp_path_factory.mktemp("sft")
    tokenizer = save_tiny_tokenizer(folder / "tokenizer")
    data = Dataset.from_dict({"prompt": [p for p, _ in PROMPTS], "completion": [c for _, c in PROMPTS]})
    gates, recorder = CopRACallback(seed=0), _Recorder()
    args = SFTConfig(
        output_dir=str(folder / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,  # one gate draw must cover both micro-batches
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        max_length=32,
        bf16=False,  # fp32 on CPU: the reload must match exactly
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )  # gradient_checkpointing stays at TRL's default (on): recomputed forwards must see the same gates
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=tiny_llama(LAYERS),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[gates, recorder],
    )
    output = trainer.train()
    trainer.save_model(str(folder / "adapter"))
    return trainer, gates, recorder, output, folder


def test_gates_follow_the_schedule_once_per_optimizer_step(trained):
    _, gates, _, _, _ = trained
    assert len(gates.masks) == STEPS  # one draw per optimizer step, not per micro-batch
    assert gates.gates.total_steps == STEPS  # the schedule spans SFTConfig.max_steps
    assert sum(gates.masks[0]) == 1  # p(0) = 0: the one player the draw keeps
    ramp_end = math.ceil(0.75 * STEPS)
    assert all(all(mask) for mask in gates.masks[ramp_end:])  # p = 1 after the ramp: plain LoRA
    assert [gates.gates.probability(t) for t in (0, 3, ramp_end)] == [0.0, 0.5, 1.0]
    assert not gates.gates.attached  # hooks removed at the end of training


def test_a_gated_off_block_gets_no_gradient_and_does_not_move(trained):
    trainer, gates, recorder, _, _ = trained
    owner = _owners(trainer, gates.gates)
    assert len(gates.gates.players) == LAYERS and set(owner.values()) == set(range(LAYERS))
    assert len(recorder.with_grad) == STEPS
    before = recorder.before
    for step, mask in enumerate(gates.masks):
        after = recorder.after[step]
        for name in after:
            on = mask[owner[name]]
            assert (name in recorder.with_grad[step]) == on, (step, name)
            if not on:
                assert torch.equal(after[name], before[name]), (step, name)  # AdamW skipped it, no decay
        before = after
    moved = [n for n in before if not torch.equal(before[n], recorder.before[n])]
    assert len(moved) == len(before)  # every adapter trained once its block was on


def test_training_loss_is_finite(trained):
    trainer, _, _, output, _ = trained
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(output.training_loss)


def test_the_saved_adapter_loads_in_peft_with_the_same_outputs(trained):
    trainer, _, _, _, folder = trained
    model = trainer.model.eval()
    assert lora_modules(model)  # still a PEFT LoRA model after the callback removed its hooks
    ids = torch.tensor([[1, 40, 50, 60, 70, 80], [1, 90, 100, 110, 120, 130]])
    with torch.no_grad():
        trained_logits = model(input_ids=ids).logits
        base = tiny_llama(LAYERS).eval()
        base_logits = base(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(base, str(folder / "adapter")).eval()
        reloaded_logits = reloaded(input_ids=ids).logits
    assert not torch.allclose(trained_logits, base_logits)  # the adapter changed the model
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=0, atol=1e-6)
