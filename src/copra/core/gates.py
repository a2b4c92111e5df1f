"""CopRA's gate controller: per-step Bernoulli gates over the LoRA layers of any PEFT model.

Paper (Zhuang et al., 2024, Eq. 2): y = f(x; (W_l + delta_l * dW_l)_l), delta_l ~ Bernoulli(p(t)).

Players. Each gate belongs to a *player*. With granularity "layer" a player is one transformer
block (every LoRA module in `...layer.3...`, `...layers.3...`, `...h.3...` shares one gate, as the
authors' code does); with "module" each LoRA module is its own player. Players keep model order.

Skipping. A gated-off module runs only its frozen base layer: during that module's forward its
adapters are disabled through PEFT's public `enable_adapters(False)` (copra.utils.compat). So the LoRA
branch (dropout copy, A and B matmuls) is never computed, its A/B are not in the autograd graph,
their grads stay None, and AdamW (which skips parameters whose grad is None) neither applies
momentum nor weight decay to them. Surviving adapters are not rescaled. The switch happens only
inside the forward (pre-hook disables, post-hook re-enables and puts back the requires_grad flags
PEFT's switch touched), so PEFT's own state is never left changed.

Modes. `step(t)` draws a fresh mask that applies while modules are in training mode; in eval mode
every adapter is on unless a mask was set explicitly with `set_active` or `active(...)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from copra.core.schedule import RAMPS, GateSchedule
from copra.utils.compat import switch_adapters_off, switch_adapters_on
from copra.utils.errors import UserError

GRANULARITIES = ("layer", "module")

# `encoder.layer.3.`, `encoder.layers.11.`, `transformer.h.0.`, `blocks.2.` ...
_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h|block|blocks)\.\d+)(?:\.|$)")
_PEFT_WRAPPER = re.compile(r"(?:^|\.)base_model\.model\.")


def lora_modules(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """All PEFT LoRA layers of `model` in model order, with their (PEFT-prefix-free) names."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            found.append((_PEFT_WRAPPER.sub(".", name).lstrip("."), module))
    return found


def player_of(module_name: str, granularity: str = "layer") -> str:
    """The player a LoRA module belongs to: its transformer block, or the module itself."""
    if granularity == "module":
        return module_name
    match = _BLOCK.match(module_name)
    return match.group(1) if match else module_name


def group_players(model: nn.Module, granularity: str = "layer") -> tuple[list[str], list[list[LoraLayer]]]:
    """(player names in model order, the LoRA modules of each player)."""
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity {granularity!r}; choose one of {list(GRANULARITIES)}")
    modules = lora_modules(model)
    if not modules:
        raise UserError(
            f"the model ({type(model).__name__}) has no PEFT LoRA modules: wrap it with "
            "peft.get_peft_model(model, LoraConfig(...)) first"
        )
    players: dict[str, list[LoraLayer]] = {}
    for name, module in modules:
        players.setdefault(player_of(name, granularity), []).append(module)
    return list(players), list(players.values())


class CopRA:
    """Draws and applies CopRA's per-player gates for a PEFT LoRA model.

    `schedule` is a GateSchedule, or total_steps with GateSchedule's other fields as keywords:
    `CopRA(model, total_steps=T, initial_p=0.1)`. Call `step(t)` once per optimizer step (before the
    first micro-batch of that step). An instance is called `gates` throughout copra.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: GateSchedule | int | None = None,
        *,
        granularity: str = "layer",
        seed: int = 0,
        **schedule_fields,
    ):
        self.schedule = GateSchedule.of(schedule, **schedule_fields)
        self.granularity = granularity
        self.players, self._groups = group_players(model, granularity)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._mask: list[bool] | None = None  # None: all on
        self._explicit = False  # True: the mask also applies in eval mode
        self._handles = []
        for index, modules in enumerate(self._groups):
            for module in modules:
                assert isinstance(module, nn.Module)  # found by model.named_modules(); LoraLayer is a mixin
                self._handles.append(module.register_forward_pre_hook(partial(self._before_forward, index)))
                self._handles.append(module.register_forward_hook(self._after_forward, always_call=True))

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def modules_of(self, index: int) -> list[LoraLayer]:
        """The LoRA modules that player `index` switches."""
        return list(self._groups[index])

    @property
    def attached(self) -> bool:
        """Whether the gate hooks are on the model (False after `remove()`)."""
        return bool(self._handles)

    # -- schedule and sampling -------------------------------------------------------------
    def probability(self, step: int) -> float:
        """p(step) under this controller's schedule."""
        return self.schedule.keep_probability(step)

    def draw(self, p: float) -> list[bool]:
        """delta_l ~ Bernoulli(p) for every player, conditioned on at least one being active.

        Equivalent to redrawing until some player is on, without the loop: if the first draw is
        empty we sample the conditional law directly (first active player k with weight (1-p)^k,
        the later ones Bernoulli(p)), which is also well defined at p = 0 (one uniform player).
        """
        n = len(self.players)
        if p >= 1.0:
            return [True] * n
        mask = torch.rand(n, generator=self._generator) < p
        if not bool(mask.any()):
            weights = (1.0 - p) ** torch.arange(n, dtype=torch.float64)
            first = int(torch.multinomial(weights, 1, generator=self._generator))
            mask = torch.zeros(n, dtype=torch.bool)
            mask[first] = True
            mask[first + 1 :] = torch.rand(n - first - 1, generator=self._generator) < p
        return mask.tolist()

    def step(self, step: int) -> list[bool]:
        """Draw the gates for optimizer step `step`, apply them in training mode, and return them.

        The draw depends only on (seed, step), so a resumed run draws exactly what an
        uninterrupted one would, with no generator state to checkpoint.
        """
        self._generator.manual_seed(self.seed * 1_000_003 + step)
        mask = self.draw(self.probability(step))
        self._mask, self._explicit = mask, False
        return mask

    # -- explicit control --------------------------------------------------------------------
    @property
    def mask(self) -> list[bool]:
        """The current gates (all True when nothing is gated)."""
        return list(self._mask) if self._mask is not None else [True] * len(self.players)

    def set_active(self, mask: Sequence[bool] | Sequence[str]) -> None:
        """Switch on exactly these players (a bool per player, or player names), in train and eval."""
        self._mask, self._explicit = self._as_mask(mask), True

    def all_on(self) -> None:
        """Every adapter on (plain LoRA), in train and eval."""
        self._mask, self._explicit = None, False

    @contextmanager
    def active(self, mask: Sequence[bool] | Sequence[str]) -> Iterator[None]:
        """`with gates.active(mask): ...` and the previous gates are restored afterwards."""
        previous = (self._mask, self._explicit)
        self.set_active(mask)
        try:
            yield
        finally:
            self._mask, self._explicit = previous

    def _as_mask(self, mask: Sequence[bool] | Sequence[str]) -> list[bool]:
        items = list(mask)
        if items and all(isinstance(m, str) for m in items):
            unknown = [m for m in items if m not in self.players]
            if unknown:
                raise UserError(f"unknown player {unknown[0]!r}; players are {self.players}")
            return [p in items for p in self.players]
        if len(items) != len(self.players):
            raise UserError(f"mask has {len(items)} entries but the model has {len(self.players)} players")
        return [bool(m) for m in items]

    # -- checkpointing (exact resume) ----------------------------------------------------------
    def state_dict(self) -> dict:
        return {"generator": self._generator.get_state(), "mask": self._mask, "explicit": self._explicit}

    def load_state_dict(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
        self._mask, self._explicit = state["mask"], state["explicit"]

    def remove(self) -> None:
        """Detach from the model: every adapter behaves as plain PEFT LoRA again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.all_on()

    # -- hooks ---------------------------------------------------------------------------------
    def is_on(self, index: int, training: bool) -> bool:
        """Whether player `index` is active for a module in training (or eval) mode right now."""
        if self._mask is None or not (training or self._explicit):
            return True
        return self._mask[index]

    def _before_forward(self, index: int, module: nn.Module, args) -> None:
        if not self.is_on(index, module.training):
            switch_adapters_off(module)  # PEFT's forward then runs the base layer only

    @staticmethod
    def _after_forward(module: nn.Module, args, output) -> None:
        switch_adapters_on(module)  # a no-op unless the pre-hook switched this module off

    def __repr__(self) -> str:
        s = self.schedule
        return (
            f"CopRA(players={len(self.players)}, granularity={self.granularity!r}, total_steps={s.total_steps}, "
            f"p: {s.initial_p}->{s.final_p} over {s.ramp_fraction:.0%} ({s.ramp}))"
        )


__all__ = ["GRANULARITIES", "RAMPS", "CopRA", "GateSchedule", "group_players", "lora_modules", "player_of"]
