"""Federated merging that one bad client cannot break: check every reply, then aggregate robustly.

A server that fuses whatever it receives (FedAvg of A and B, `copra.adapters.merge.fusion`) hands every
participant garbage as soon as one client sends a NaN, a mis-scaled adapter or another task's adapter.
Here, stateless functions on adapter state dicts (PEFT keys), as Flower's `aggregate.py`:

  * `check_reply(reference, reply)`: keys, dtypes, shapes (so the rank) equal the round's, every value
    finite, the LoRA settings equal; a reason string, or None for a good reply. Never raises.
  * `norm_outliers(norms, factor)`: a reply whose update norm ||theta_i - theta_start|| (all A and B
    factors; in round 1 without a shared start, ||theta_i||) is more than `factor` times the round's
    median, or less than 1/`factor` of it, is an outlier. The median is the lower one (`median_low`):
    with two replies it is the smaller norm, so a x100 reply cannot drag the reference up.
  * `screen(...)`: both, over a round's replies.
  * `aggregate(states, weights, method)`: fusion (weighted mean), or Flower's own robust rules
    (`flwr.server.strategy.aggregate`), applied to each A and B tensor as fusion is:
      - trimmed_mean (Yin et al., ICML 2018): per coordinate, drop the `num_malicious` largest and
        smallest values, average the rest (`aggregate_trimmed_avg`, unweighted);
      - median (Yin et al., 2018): per coordinate median (`aggregate_median`, unweighted);
      - krum (Blanchard et al., NeurIPS 2017): the one reply whose summed squared distance to its
        n - f - 2 nearest replies is smallest (`aggregate_krum`, distances over all factors at once).
    `clip_norm` first scales each update down to that L2 norm (theta_start + min(1, c/||u||) u).

Robust rules other than fusion ignore the weights (as Flower's do) and need flwr, imported on use.
`Policy` also holds the differential-privacy settings; their merge is `copra.federated.privacy.dp_merge`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from copra.adapters.merge import fusion
from copra.utils.errors import UserError

Adapter = dict[str, torch.Tensor]
AGGREGATES = ("fusion", "trimmed_mean", "median", "krum")
FAULTS = ("nan", "scale100")  # what a test client can be made to send (`FederatedConfig.faults`)


@dataclass(frozen=True)
class Policy:
    """How a server screens and aggregates a round's replies (the same settings in every runner)."""

    aggregate: str = "fusion"  #: fusion | trimmed_mean | median | krum
    clip_norm: float = 0.0  #: each update is scaled down to this L2 norm before aggregating (0: off)
    norm_factor: float = (
        10.0  #: reject a reply whose update norm is off the round's median by more than this factor (0: off)
    )
    num_malicious: int = 1  #: bad replies the robust rules withstand: trimmed_mean cuts this many per end, krum's f
    dp_noise_multiplier: float = 0.0  #: differential privacy (copra.federated.privacy): noise std / S/m (0: off)
    dp_clip_norm: float = 0.0  #: differential privacy: each update clipped to this L2 norm before the mean

    @classmethod
    def of(cls, settings) -> Policy:
        """The policy a config names (FederatedConfig, the ServerApp's DeploySettings: same field names)."""
        return cls(*(getattr(settings, f.name) for f in fields(cls)))

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise UserError(f"unknown aggregate {self.aggregate!r}; choose from {', '.join(AGGREGATES)}")
        for name in ("clip_norm", "norm_factor", "dp_noise_multiplier", "dp_clip_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UserError(f"{name} must be a finite number >= 0 (0: off), got {value!r}")
        if 0 < self.norm_factor <= 1:
            raise UserError(f"norm_factor must be 0 (off) or above 1, got {self.norm_factor!r}")
        if isinstance(self.num_malicious, bool) or not isinstance(self.num_malicious, int) or self.num_malicious < 0:
            raise UserError(f"num_malicious must be an integer >= 0, got {self.num_malicious!r}")
        if self.dp:
            _check_privacy(self)
        elif self.dp_clip_norm:
            raise UserError(
                "dp_clip_norm is set but dp_noise_multiplier is 0 (no DP); set both, or clip_norm to clip alone"
            )

    @property
    def dp(self) -> bool:
        """Whether the merge is differentially private (Gaussian noise on the mean of clipped updates)."""
        return self.dp_noise_multiplier > 0


def _check_privacy(policy: Policy) -> None:
    """DP's noise is calibrated to one client's largest effect on the mean, so nothing else may change that effect."""
    if not policy.dp_clip_norm:
        raise UserError("dp_noise_multiplier needs dp_clip_norm > 0: the noise is scaled to it")
    if policy.aggregate != "fusion":
        raise UserError(
            f"differential privacy adds noise to a mean: aggregate must be fusion, not {policy.aggregate!r}"
        )
    if policy.clip_norm:
        raise UserError("dp_clip_norm already clips every update; set clip_norm to 0")
    if policy.norm_factor:
        raise UserError(
            "with differential privacy set norm_factor=0: the norm test merges a reply or not by the round's median, "
            "so one client's data could drop another's (dp_clip_norm bounds every reply instead)"
        )


def lora_rank(key: str, shape: tuple[int, ...]) -> int | None:
    """The rank a LoRA factor's shape says: A is [r, in], B is [out, r]; None for other keys."""
    if len(shape) < 2:
        return None
    if ".lora_A" in key or ".lora_embedding_A" in key:
        return shape[0]
    if ".lora_B" in key or ".lora_embedding_B" in key:
        return shape[1]
    return None


def check_reply(
    reference: Mapping[str, torch.Tensor],
    reply: Any,
    lora: Mapping[str, Any] | None = None,
    expected_lora: Mapping[str, Any] | None = None,
) -> str | None:
    """Why `reply` cannot be merged into a round whose adapters look like `reference`, or None if it can.

    Checked in order: a mapping of tensors, the same keys, per key the dtype, rank and shape, finite
    values; then every setting in `expected_lora` (rank, alpha, ...) equal in `lora`. Never raises.
    """
    try:
        return _reason(reference, reply, lora, expected_lora)
    except Exception as error:  # a reply is data from outside: whatever it does, it is a reason, not a crash
        return f"unreadable reply ({type(error).__name__}: {error})"[:300]


def _reason(reference, reply, lora, expected_lora) -> str | None:
    if not isinstance(reply, Mapping):
        return f"not a mapping of tensors but {type(reply).__name__}"
    missing = sorted(set(reference) - set(reply))
    extra = sorted(map(repr, set(reply) - set(reference)))
    if missing:
        return f"{len(missing)} key(s) missing, first {missing[0]!r}"
    if extra:
        return f"{len(extra)} unexpected key(s), first {extra[0][:80]}"
    for key in sorted(reference):
        want, got = reference[key], reply[key]
        if not isinstance(got, torch.Tensor):
            return f"{key}: not a tensor but {type(got).__name__}"
        if got.dtype != want.dtype:
            return f"{key}: dtype {str(got.dtype).removeprefix('torch.')}, expected {str(want.dtype).removeprefix('torch.')}"
        rank, wanted_rank = lora_rank(key, tuple(got.shape)), lora_rank(key, tuple(want.shape))
        if rank != wanted_rank:
            return f"{key}: rank {rank}, expected {wanted_rank}"
        if tuple(got.shape) != tuple(want.shape):
            return f"{key}: shape {list(got.shape)}, expected {list(want.shape)}"
        if not bool(torch.isfinite(got).all()):
            return f"{key}: {int((~torch.isfinite(got)).sum())} value(s) NaN or inf"
    for name, value in (expected_lora or {}).items():
        if (lora or {}).get(name) != value:
            return f"LoRA setting {name} = {(lora or {}).get(name)!r}, expected {value!r}"
    return None


def update_norm(state: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor] | None = None) -> float:
    """||state - start|| over all tensors (float64); ||state|| when there is no start."""
    total = 0.0
    for key, value in state.items():
        delta = value.double() - (start[key].double() if start is not None else 0.0)
        total += float(delta.square().sum())
    return math.sqrt(total)


def norm_outliers(norms: Sequence[float], factor: float) -> list[str | None]:
    """Per norm, a reason when it is off the lower median of `norms` by more than `factor` (0: no check)."""
    if not factor or not norms:
        return [None] * len(norms)
    median = statistics.median_low(norms)
    out: list[str | None] = []
    for n in norms:
        if n > factor * median or n * factor < median:
            out.append(f"update norm {n:.4g} is off the round's median {median:.4g} by more than x{factor:g}")
        else:
            out.append(None)
    return out


def screen(
    reference: Mapping[str, torch.Tensor],
    replies: Sequence[Any],
    policy: Policy,
    start: Mapping[str, torch.Tensor] | None = None,
    loras: Sequence[Mapping[str, Any] | None] | None = None,
    expected_lora: Mapping[str, Any] | None = None,
) -> list[str | None]:
    """Per reply, why it is rejected (None: accepted): `check_reply`, then the norm test among those that pass."""
    loras = list(loras) if loras is not None else [None] * len(replies)
    reasons = [
        check_reply(reference, reply, lora if expected_lora else None, expected_lora)
        for reply, lora in zip(replies, loras)
    ]
    passed = [i for i, reason in enumerate(reasons) if reason is None]
    norms = [update_norm(replies[i], start) for i in passed]
    for i, outlier in zip(passed, norm_outliers(norms, policy.norm_factor)):
        reasons[i] = outlier
    return reasons


def clip_update(state: Adapter, start: Adapter | None, clip_norm: float) -> Adapter:
    """start + u * min(1, clip_norm / ||u||), u = state - start (no start: the state itself is u)."""
    norm = update_norm(state, start)
    if not clip_norm or norm <= clip_norm:
        return state
    scale = clip_norm / norm
    if start is None:
        return {k: v * scale for k, v in state.items()}
    return {k: start[k] + (v - start[k]) * scale for k, v in state.items()}


def aggregate(
    states: Sequence[Adapter],
    weights: Sequence[float],
    method: str = "fusion",
    clip_norm: float = 0.0,
    start: Adapter | None = None,
    num_malicious: int = 1,
) -> Adapter:
    """The round's merged adapter from accepted replies: clip (optional), then fusion or a robust rule."""
    if not states:
        raise ValueError("aggregate needs at least one adapter")
    states = [clip_update(s, start, clip_norm) for s in states]
    if method == "fusion":
        return fusion(states, weights)
    if method not in AGGREGATES:
        raise UserError(f"unknown aggregate {method!r}; choose from {', '.join(AGGREGATES)}")
    from copra.federated.flower import require_flwr

    require_flwr()
    from flwr.server.strategy import aggregate as flower

    keys = sorted(states[0])
    results = [([s[k].detach().cpu().double().numpy() for k in keys], 1) for s in states]  # Flower's (NDArrays, n)
    if method == "median":
        arrays = flower.aggregate_median(results)
    elif method == "trimmed_mean":
        cut = min(num_malicious, (len(states) - 1) // 2)  # keep at least one value per coordinate
        arrays = flower.aggregate_trimmed_avg(
            results, proportiontocut=(cut + 0.25) / len(states)
        )  # int(. * n) = cut, < 0.5
    else:
        arrays = flower.aggregate_krum(results, num_malicious=num_malicious, to_keep=0)
    return {k: torch.from_numpy(np.asarray(a)).to(states[0][k].dtype) for k, a in zip(keys, arrays)}


def apply_fault(state: Adapter, fault: str | None) -> Adapter:
    """What a faulty test client sends instead of `state`: nan (one NaN in the first tensor), scale100 (x100)."""
    if fault is None:
        return state
    if fault == "scale100":
        return {k: v * 100 for k, v in state.items()}
    if fault == "nan":
        out = {k: v.clone() for k, v in state.items()}
        first = out[sorted(out)[0]]
        first.view(-1)[0] = float("nan")
        return out
    raise UserError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
