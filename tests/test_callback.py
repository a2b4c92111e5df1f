"""CopRACallback inside a real transformers.Trainer (tiny model, a few steps, CPU)."""

import torch
from torch import nn

from copra import CopRACallback

from conftest import tiny_lora_bert


class _Regressor(nn.Module):
    """Trainer wants a loss: mean-pooled tiny BERT to a scalar target."""

    def __init__(self):
        super().__init__()
        self.encoder = tiny_lora_bert(layers=3, init_lora_weights=True)

    def forward(self, input_ids, attention_mask, labels=None):
        pooled = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean((1, 2))
        return {"loss": ((pooled - labels) ** 2).mean(), "logits": pooled}


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(1, 64, (6,), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(float(i % 3))}


def test_callback_gates_every_optimizer_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _Regressor()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    callback = CopRACallback(seed=1)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[callback]).train()
    assert len(callback.masks) == 8  # one draw per optimizer step, not per micro-batch
    assert sum(callback.masks[0]) == 1 and all(callback.masks[-1])  # p(0) = 0 -> one player; p(T-1) = 1
    assert callback.gates.total_steps == 8
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved  # training happened
    assert not callback.gates.attached  # hooks removed at the end: plain PEFT model again


def test_callback_takes_a_gate_schedule_or_the_trainers_steps():
    from types import SimpleNamespace

    import pytest

    from copra.core.schedule import GateSchedule
    from copra.utils.errors import UserError

    from conftest import tiny_lora_bert

    state = SimpleNamespace(max_steps=99)
    schedule = GateSchedule(12, initial_p=0.5)
    given = CopRACallback(schedule, granularity="module", seed=3)
    given.on_train_begin(None, state, None, model=tiny_lora_bert())
    assert given.gates.schedule is schedule and len(given.gates.players) == 9 and given.gates.seed == 3
    from_trainer = CopRACallback(final_p=0.8)
    from_trainer.on_train_begin(None, state, None, model=tiny_lora_bert())
    assert from_trainer.gates.schedule == GateSchedule(99, final_p=0.8)
    with pytest.raises(UserError, match="ramp must be one of"):
        CopRACallback(ramp="cubic")  # refused when made, not when training starts
