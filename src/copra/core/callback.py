"""CopRA inside `transformers.Trainer`: a TrainerCallback that draws the gates every optimizer step.

    trainer = Trainer(model=peft_model, ..., callbacks=[CopRACallback(seed=0)])

`on_step_begin` fires once per optimizer step (before the first micro-batch of a gradient-
accumulation step), so every micro-batch of a step sees the same gates. Evaluation runs in eval
mode, where every adapter is on.
"""

from __future__ import annotations

from transformers import TrainerCallback

from copra.core.gates import CopRA
from copra.core.schedule import GateSchedule


class CopRACallback(TrainerCallback):
    """Gate PEFT LoRA layers as CopRA does.

    `schedule` is a GateSchedule, or total_steps with GateSchedule's other fields as keywords (as for
    `CopRA`); without total_steps the schedule spans the Trainer's max_steps.
    """

    def __init__(
        self,
        schedule: GateSchedule | int | None = None,
        *,
        granularity: str = "layer",
        seed: int = 0,
        **schedule_fields,
    ):
        if schedule is None and schedule_fields.get("total_steps") is None:
            schedule_fields.pop("total_steps", None)
            GateSchedule(1, **schedule_fields)  # bad fields fail now, not when training starts
        else:
            schedule = GateSchedule.of(schedule, **schedule_fields)
            schedule_fields = {}
        self.schedule, self._fields = schedule, schedule_fields
        self.granularity, self.seed = granularity, seed
        self.gates: CopRA | None = None
        self.masks: list[list[bool]] = []  # one per optimizer step, for inspection

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.gates is not None:
            self.gates.remove()
        schedule = self.schedule or GateSchedule(state.max_steps, **self._fields)
        self.gates = CopRA(model, schedule, granularity=self.granularity, seed=self.seed)

    def on_step_begin(self, args, state, control, **kwargs):
        assert self.gates is not None  # made by on_train_begin, which the Trainer calls first
        self.masks.append(self.gates.step(state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        assert self.gates is not None  # made by on_train_begin
        self.gates.remove()  # the trained model is plain PEFT LoRA again
