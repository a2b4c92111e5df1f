"""Differential privacy of the merged adapter (optional): DP-FedAvg with server-side fixed clipping.

McMahan et al., "Learning Differentially Private Recurrent Language Models" (ICLR 2018), as Flower's
`DifferentialPrivacyServerSideFixedClipping` implements it. Per round, over the m accepted replies:

    u_i   = theta_i - theta_start              all LoRA A and B factors as one vector, as fusion treats them
                                               (round 1 without a shared start: u_i = theta_i)
    u_i  <- u_i * min(1, S / ||u_i||)          S = dp_clip_norm (Flower's compute_clip_model_update)
    theta = theta_start + (1/m) sum_i u_i + N(0, sigma^2) per coordinate,  sigma = z S / m  (Flower's compute_stdv)

with z = dp_noise_multiplier. The mean is unweighted: one client then moves it by at most S/m, the
scale sigma is calibrated to (fusion's n_i / N would let a larger client move it further).

Flower's wrapper itself cannot take copra's screened replies: it clips every reply before copra can
check it (a reply of another shape makes it raise), skips the round when any node sent an error reply
(a dead node would cost the round and its record), and draws its noise from numpy's global, unseeded
RNG. So copra calls the functions the wrapper calls (`copra.utils.compat.flower_fixed_clipping`) on the
accepted replies, and draws the same noise, N(0, sigma^2) per coordinate, from its own `GaussianNoise`:
a numpy Generator seeded from the run seed whose state every runner saves with each round, so a
resumed run draws what an uninterrupted one would.

What this protects: whoever receives the merged adapters (the clients, users of the model) learns
little about any one client's data. Not the server: it sees every reply in the clear. No (epsilon,
delta) is computed here; that needs an accountant over the rounds (docs/federated.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from copra.adapters.merge import fusion
from copra.federated.robust import update_norm
from copra.utils.compat import flower_fixed_clipping
from copra.utils.errors import UserError

Adapter = dict[str, torch.Tensor]
NOISE_STREAM = 26  # spawn key: the noise stream of run seed s is independent of everything else seeded by s


class GaussianNoise:
    """The run's noise source: numpy's PCG64 seeded from the run seed; `state()` is JSON and resumes it."""

    def __init__(self, seed: int, state: dict[str, Any] | None = None) -> None:
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(NOISE_STREAM,))))
        if state is not None:
            try:
                self.rng.bit_generator.state = state
            except (TypeError, ValueError, KeyError, OverflowError) as error:
                raise UserError(f"cannot resume the DP noise from the saved state ({error})") from None

    def state(self) -> dict[str, Any]:
        """Where the generator stands (PCG64's state: plain ints, so it goes into JSON as it is)."""
        return dict(self.rng.bit_generator.state)

    def normal(self, std: float, shape: tuple[int, ...]) -> np.ndarray:
        """N(0, std^2) per coordinate, as Flower's add_gaussian_noise_inplace draws it."""
        return self.rng.normal(0.0, std, shape)


def dp_merge(
    states: Sequence[Adapter], start: Adapter | None, clip_norm: float, noise_multiplier: float, noise: GaussianNoise
) -> tuple[Adapter, dict[str, Any]]:
    """(the noised mean of the clipped updates, the round's record: clip_norm, noise_multiplier, noise_std,
    replies, clipped = how many updates were longer than clip_norm)."""
    if not states:
        raise ValueError("dp_merge needs at least one adapter")
    keys = sorted(states[0])
    begin = [
        np.zeros(tuple(states[0][k].shape)) if start is None else start[k].detach().cpu().double().numpy()
        for k in keys
    ]
    replies = [[s[k].detach().cpu().double().numpy() for k in keys] for s in states]
    clipped, std = flower_fixed_clipping(replies, begin, clip_norm, noise_multiplier)
    adapters = [{k: torch.from_numpy(a).to(states[0][k].dtype) for k, a in zip(keys, r)} for r in clipped]
    mean = fusion(adapters, [1 / len(adapters)] * len(adapters))
    merged = {k: mean[k] + torch.from_numpy(noise.normal(std, tuple(mean[k].shape))).to(mean[k].dtype) for k in keys}
    record = {
        "clip_norm": clip_norm,
        "noise_multiplier": noise_multiplier,
        "noise_std": std,
        "replies": len(states),
        "clipped": sum(update_norm(s, start) > clip_norm for s in states),
    }
    return merged, record
