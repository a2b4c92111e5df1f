"""CopRA inside `transformers.Trainer`: a TrainerCallback that draws the gates every optimizer step.

    trainer = Trainer(model=peft_model, ..., callbacks=[CopRACallback(seed=0)])

`on_step_begin` fires once per optimizer step (before the first micro-batch of a gradient-
accumulation step), so every micro-batch of a step sees the same gates. Evaluation runs in eval
mode, where every adapter is on.
"""

from __future__ import annotations

from transformers import TrainerCallback

from copra.gates import CopRA


class CopRACallback(TrainerCallback):
    """Gate PEFT LoRA layers as CopRA does; `total_steps` defaults to the Trainer's max_steps."""

    def __init__(
        self,
        total_steps: int | None = None,
        initial_p: float = 0.0,
        final_p: float = 1.0,
        ramp_fraction: float = 0.75,
        granularity: str = "layer",
        seed: int = 0,
        ramp: str = "linear",
    ):
        self.total_steps = total_steps
        self.options = dict(
            initial_p=initial_p, final_p=final_p, ramp_fraction=ramp_fraction, granularity=granularity, seed=seed, ramp=ramp
        )
        self.gates: CopRA | None = None
        self.masks: list[list[bool]] = []  # one per optimizer step, for inspection

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.gates is not None:
            self.gates.remove()
        self.gates = CopRA(model, total_steps=self.total_steps or state.max_steps, **self.options)

    def on_step_begin(self, args, state, control, **kwargs):
        self.masks.append(self.gates.step(state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        self.gates.remove()  # the trained model is plain PEFT LoRA again
