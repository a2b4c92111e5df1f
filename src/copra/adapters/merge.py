"""Merging LoRA adapters: pure functions from adapter state dicts to an adapter state dict.

Paper: Zhuang et al., "CopRA: A Progressive LoRA Training Strategy" (2024), Sec. 3.1. CopRA's
random layer gating makes each adapter behave like a cooperative-game player, and the adapters that
come out merge well ("linear mode connectivity"). Two ways to merge adapters 1 and 2 at weight alpha:

    Fusion   dW_f = (a B1 + (1-a) B2)(a A1 + (1-a) A2)    same rank r, averages the factors
    Mixture  dW_m =  a B1 A1 + (1-a) B2 A2                exact average of the updates, rank 2r

Fusion only equals mixture when the factors agree; since B A = (B P)(P^-1 A) for any invertible P,
`copra.adapters.align.align` first picks P for the second adapter to shrink the bound
||dW_f - dW_m||_2 <= a(1-a)(||B1 - B2 P||_2 + ||A1 - P^-1 A2||_2), then fusion averages.

An adapter is a state dict keyed as PEFT saves it (get_peft_model_state_dict, adapter_model.safetensors):
`<prefix>.lora_A.weight` [r, in] pairs with `<prefix>.lora_B.weight` [out, r] (embedding layers:
`lora_embedding_A` [r, vocab] with `lora_embedding_B` [dim, r]; conv layers: flattened past dim 1).
Any other key (bias, DoRA magnitude, ...) is merged by the weighted sum. No model, no file I/O here:
the caller loads the adapters and writes the result (with `mixture_config` for a mixture).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from copra.utils.errors import UserError

Adapter = dict[str, torch.Tensor]

# A-factor name -> its B-factor name, as a dotted key component.
_PAIRS = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}
# Config fields that must agree for two adapters to be merged (missing = PEFT's default).
_CONFIG_FIELDS: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 8,
    "use_rslora": False,
    "target_modules": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}


def module_pairs(adapter: Adapter) -> list[tuple[str, str, str]]:
    """(module prefix, A key, B key) for every LoRA module of `adapter`, in key order."""
    pairs = []
    for key in adapter:
        parts = key.split(".")
        hits = [i for i, part in enumerate(parts) if part in _PAIRS]
        if not hits:
            continue
        i = hits[-1]
        b_key = ".".join(parts[:i] + [_PAIRS[parts[i]]] + parts[i + 1 :])
        if b_key not in adapter:
            raise UserError(f"adapter key {key!r} has no matching {b_key!r}")
        pairs.append((".".join(parts[:i]), key, b_key))
    return pairs


def _b_keys(adapter: Adapter) -> set[str]:
    return {b for _, _, b in module_pairs(adapter)}


def _normalise(field: str, value):
    if field == "target_modules" and isinstance(value, (list, tuple, set)):
        return sorted(value)  # JSON writes PEFT's set as a list in any order
    return value


def check_compatible(adapters: Sequence[Adapter], configs: Sequence[dict] | None = None) -> None:
    """Raise UserError naming the first key/field where the adapters cannot be merged."""
    if len(adapters) == 0:
        raise UserError("no adapters to merge")
    ref = adapters[0]
    ref_pairs = module_pairs(ref)
    if not ref_pairs:
        raise UserError("adapter 0 has no LoRA weights (no key contains 'lora_A')")
    for prefix, a_key, b_key in ref_pairs:
        if ref[a_key].shape[0] != ref[b_key].shape[1]:
            raise UserError(
                f"adapter 0: {prefix!r} has rank {ref[a_key].shape[0]} in lora_A but {ref[b_key].shape[1]} in lora_B"
            )
    for n, adapter in enumerate(adapters):
        missing = sorted(set(ref) - set(adapter))
        extra = sorted(set(adapter) - set(ref))
        if missing:
            raise UserError(f"adapter {n} lacks key {missing[0]!r} that adapter 0 has")
        if extra:
            raise UserError(f"adapter {n} has key {extra[0]!r} that adapter 0 lacks")
        for key, tensor in adapter.items():
            if tuple(tensor.shape) != tuple(ref[key].shape):
                what = "rank" if "lora_" in key else "shape"
                raise UserError(
                    f"adapter {n}: {key!r} has shape {tuple(tensor.shape)}, adapter 0 has "
                    f"{tuple(ref[key].shape)} (different {what})"
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise UserError(f"adapter {n}: {key!r} contains NaN or inf")
    if configs is None:
        return
    if len(configs) != len(adapters):
        raise UserError(f"got {len(configs)} adapter configs for {len(adapters)} adapters")
    for n, config in enumerate(configs):
        for field, default in _CONFIG_FIELDS.items():
            mine = _normalise(field, config.get(field, default))
            first = _normalise(field, configs[0].get(field, default))
            if mine != first:
                raise UserError(f"adapter {n}: config field {field!r} is {mine!r}, adapter 0 has {first!r}")


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Merge weights as floats: one per adapter and finite (they need not sum to 1). None = 1/n each."""
    if weights is None:
        return [1.0 / n] * n
    try:
        out = [float(w) for w in weights]
    except (TypeError, ValueError) as exc:
        raise UserError(f"merge weights must be numbers, got {list(weights)!r}") from exc
    if len(out) != n:
        raise UserError(f"got {len(out)} merge weights for {n} adapters")
    for i, w in enumerate(out):
        if not math.isfinite(w):
            raise UserError(f"merge weight {i} is {w} (weights must be finite)")
    return out


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    # float64 accumulation on CPU, then back to the first tensor's dtype and device.
    acc = sum(w * t.detach().to("cpu", torch.float64) for w, t in zip(weights, tensors))
    assert isinstance(acc, torch.Tensor)  # never sum()'s start 0: callers pass one tensor per adapter, at least one
    return acc.to(tensors[0].device, tensors[0].dtype)


def fusion(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """Average the factors: B_f = sum_i w_i B_i, A_f = sum_i w_i A_i (and every other key alike).

    Same rank and config as the inputs. `align` the adapters first to make it close to `mixture`.
    """
    check_compatible(adapters)
    w = check_weights(weights, len(adapters))
    return {key: _weighted_sum([a[key] for a in adapters], w) for key in adapters[0]}


def mixture(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """The exact update sum_i w_i B_i A_i, written as one LoRA adapter of rank n*r.

    B = [w_1 B_1 | ... | w_n B_n]  [out, n*r];  A = [A_1; ...; A_n]  [n*r, in];  so B A = sum w_i B_i A_i.
    Other keys are weight-summed. Save it with `mixture_config(config, n)`: PEFT scales B A by
    lora_alpha/r (or lora_alpha/sqrt(r) with rsLoRA), and r becomes n*r, so lora_alpha must grow too.
    """
    check_compatible(adapters)
    w = check_weights(weights, len(adapters))
    b_keys = _b_keys(adapters[0])
    a_keys = {a for _, a, _ in module_pairs(adapters[0])}
    out: Adapter = {}
    for key, ref in adapters[0].items():
        if key in b_keys:  # B_i [out, r, ...] -> [out, n*r, ...]
            out[key] = torch.cat([(wi * a[key].detach().double()).to(ref.dtype) for wi, a in zip(w, adapters)], 1)
        elif key in a_keys:  # A_i [r, in, ...] -> [n*r, in, ...]
            out[key] = torch.cat([a[key].detach() for a in adapters], 0)
        else:
            out[key] = _weighted_sum([a[key] for a in adapters], w)
    return out


def mixture_config(config: dict, n: int) -> dict:
    """A copy of a PEFT LoRA adapter_config for the rank-(n*r) adapter `mixture` returns.

    r -> n*r, and lora_alpha -> n*lora_alpha (plain scaling alpha/r) or sqrt(n)*lora_alpha (rsLoRA,
    alpha/sqrt(r)), so every module's scaling is unchanged; rank_pattern/alpha_pattern likewise.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"mixture_config needs a positive integer number of adapters, got {n!r}")
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise UserError(f"adapter config has no {field!r} field")
    grow = math.sqrt(n) if config.get("use_rslora", False) else float(n)
    out = dict(config)
    out["r"] = int(config["r"]) * n
    out["lora_alpha"] = config["lora_alpha"] * grow
    if config.get("rank_pattern"):
        out["rank_pattern"] = {k: int(v) * n for k, v in config["rank_pattern"].items()}
    if config.get("alpha_pattern"):
        out["alpha_pattern"] = {k: v * grow for k, v in config["alpha_pattern"].items()}
    return out


def delta_weights(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Module prefix -> B @ A [out, in] (unscaled; conv factors flattened past dim 1, embeddings
    give PEFT's (B A) before its transpose)."""
    return {prefix: adapter[b].flatten(1) @ adapter[a].flatten(1) for prefix, a, b in module_pairs(adapter)}


def scale_update(adapter: Adapter, factor: float) -> Adapter:
    """The same adapter with every update B A multiplied by `factor` (B scaled; A and other keys kept).

    The shrinkage control of a merge: fusing two adapters at 1/2 keeps (B1/2)(A1/2), a quarter of each
    one's own update, so `scale_update(adapter, 0.25)` shows how much of a merge's loss shrinking alone
    explains; the rest is the cross terms B1 A2 and B2 A1 (misalignment).
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise UserError(f"scale_update needs a finite number, got {factor!r}")
    b_keys = _b_keys(adapter)
    return {k: (v * factor if k in b_keys else v) for k, v in adapter.items()}


MERGERS = {"fusion": fusion, "mixture": mixture}


__all__ = [
    "MERGERS",
    "Adapter",
    "check_compatible",
    "check_weights",
    "delta_weights",
    "fusion",
    "mixture",
    "mixture_config",
    "module_pairs",
    "scale_update",
]
