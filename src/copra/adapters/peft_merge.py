"""PEFT's own merge methods on adapter state dicts, without the base model's weights.

`peft.LoraModel.add_weighted_adapter` (TIES: Yadav et al. 2023; DARE: Yu et al. 2023; SVD and
magnitude merges) needs a model holding every adapter. Merging needs only the adapters, so copra
builds a *skeleton*: an `nn.Module` with one `nn.Linear(in, out)` per LoRA module (GPT-2's Conv1D
for fan_in_fan_out adapters), at the same module path, its in/out features read from the A/B shapes and its weight a zero-stride view of one
zero (no base weights in memory, no hub access: `base_model_name_or_path` may be a hub name or empty).
PEFT wraps it, the adapters are loaded by name, PEFT merges them with exactly the given weights,
and the result is the merged adapter's PEFT state dict and config. copra re-implements none of it.

What each method means for LoRA (s_i = adapter i's scaling alpha/r or alpha/sqrt(r), w_i its weight):

    linear            A = sum_i sign(w_i) sqrt(|w_i s_i|) A_i,  B = sum_i sqrt(|w_i s_i|) B_i  (factors, rank r;
                      with equal s and w_i >= 0 this is s * copra fusion at weights sqrt(w_i)/sum sqrt(w_j),
                      scaled by (sum_j sqrt(w_j))^2: weights 1/2, 1/2 give twice fusion(1/2, 1/2)'s update)
    cat               B A = sum_i w_i s_i B_i A_i exactly, rank sum r_i   (= copra mixture)
    svd               rank-k truncated SVD of sum_i w_i s_i B_i A_i (k = svd_rank, default max r_i)
    ties, dare_linear, dare_ties, magnitude_prune
                      the TIES / DARE / magnitude rule applied to the A_i and, separately, to the B_i
                      (task tensors = factors, weights sqrt(|w_i s_i|)), not to the updates B_i A_i
    *_svd variants    the same rule on the updates dW_i = s_i B_i A_i, then a rank-k truncated SVD

The merged adapter has r = lora_alpha = its rank, so its own scaling is 1 (the s_i are folded in).
DARE drops entries at random with torch's global generator: copra seeds it (`seed`) inside a forked
RNG, so a merge is reproducible; the draws equal PEFT's on a full model when both visit the modules
in the same order (the skeleton lists them in natural order: layer 2 before layer 10, then by name).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from copra.adapters.merge import Adapter, check_weights, module_pairs
from copra.utils.compat import fold_rslora_scaling
from copra.utils.errors import UserError

PEFT_METHODS = (
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
DENSITY_METHODS = tuple(m for m in PEFT_METHODS if m not in ("linear", "cat", "svd"))
SIGN_METHODS = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
SAME_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # PEFT's rule
MERGED = "default"  # PEFT saves the adapter named "default" at the folder's root
_PREFIX = "base_model.model."


def check_options(
    method: str, density: float | None, majority_sign_method: str | None, svd_rank: int | None = None
) -> tuple[float | None, str]:
    """(density, majority_sign_method) checked for `method`; UserError names the bad option."""
    if method not in PEFT_METHODS:
        raise UserError(f"unknown PEFT merge method {method!r}; choose one of {list(PEFT_METHODS)}")
    if method in DENSITY_METHODS:
        if density is None:
            raise UserError(f"merge method {method!r} needs a density in (0, 1]")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise UserError(f"density must be a number in (0, 1], got {density!r}")
    elif density is not None:
        raise UserError(f"density applies only to {list(DENSITY_METHODS)}, not to {method!r}")
    if majority_sign_method is not None and method not in SIGN_METHODS:
        raise UserError(f"majority sign method applies only to {list(SIGN_METHODS)}, not to {method!r}")
    sign = "total" if majority_sign_method is None else majority_sign_method
    if sign not in ("total", "frequency"):
        raise UserError(f"majority sign method must be 'total' or 'frequency', got {sign!r}")
    if svd_rank is not None and (
        not method.endswith("svd") or isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1
    ):
        raise UserError(f"svd_rank must be a positive integer and only with an SVD method, got {svd_rank!r}")
    return (None if density is None else float(density)), sign


def _natural(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def _shapes(state: Adapter) -> dict[str, tuple[int, int, int]]:
    """Module path (no PEFT prefix) -> (in features, out features, rank) of a plain-Linear LoRA adapter."""
    out = {}
    for prefix, a_key, b_key in module_pairs(state):
        a, b = state[a_key], state[b_key]
        if "lora_embedding_" in a_key or a.dim() != 2 or b.dim() != 2:
            raise UserError(f"PEFT merges here take LoRA on linear layers only; {a_key!r} is not one")
        out[prefix.removeprefix(_PREFIX)] = (a.shape[1], b.shape[0], a.shape[0])
    extra = sorted(set(state) - {k for _, a, b in module_pairs(state) for k in (a, b)})
    if extra:
        raise UserError(f"PEFT merges take plain LoRA adapters (lora_A/lora_B only); found {extra[0]!r}")
    return out


def check_inputs(states: Sequence[Adapter], configs: Sequence[dict], method: str) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) shared by every adapter; UserError naming the first mismatch."""
    shapes = [_shapes(s) for s in states]
    for n, (state, config) in enumerate(zip(states, configs)):
        for key, tensor in state.items():
            if not bool(torch.isfinite(tensor).all()):
                raise UserError(f"adapter {n}: {key!r} contains NaN or inf")
        for field in ("use_dora", "lora_bias"):
            if config.get(field):
                raise UserError(
                    f"adapter {n}: PEFT's add_weighted_adapter does not merge {field} adapters correctly "
                    "(peft issue #3761); use fusion or mixture"
                )
        if set(shapes[n]) != set(shapes[0]):
            odd = sorted(set(shapes[n]) ^ set(shapes[0]))[0]
            raise UserError(f"adapter {n} and adapter 0 differ in LoRA module {odd!r}")
        for path, (fan_in, fan_out, rank) in shapes[n].items():
            if (fan_in, fan_out) != shapes[0][path][:2]:
                raise UserError(
                    f"adapter {n}: module {path!r} is {fan_in}->{fan_out}, adapter 0 has "
                    f"{shapes[0][path][0]}->{shapes[0][path][1]}"
                )
            if method in SAME_RANK_METHODS and rank != shapes[0][path][2]:
                raise UserError(
                    f"merge method {method!r} needs equal ranks; module {path!r} has rank {rank} "
                    f"in adapter {n}, {shapes[0][path][2]} in adapter 0 (use cat or an SVD method)"
                )
    return {path: shape[:2] for path, shape in shapes[0].items()}


def skeleton(
    shapes: dict[str, tuple[int, int]], dtype: torch.dtype = torch.float32, conv1d: bool = False
) -> nn.Module:
    """An nn.Module with an nn.Linear(in, out) at each module path; weights are one shared zero (no memory).

    `conv1d`: transformers' Conv1D (GPT-2's [in, out] layer) instead, for fan_in_fan_out adapters, so
    PEFT lays out their updates (and DARE draws its drops) exactly as on the real model.
    """
    root = nn.Module()
    zero = torch.zeros((), dtype=dtype)
    for path in sorted(shapes, key=_natural):
        fan_in, fan_out = shapes[path]
        parent = root
        *parents, leaf = path.split(".")
        for name in parents:
            child = dict(parent.named_children()).get(name)
            if child is None:
                child = nn.Module()
                parent.add_module(name, child)
            parent = child
        layer: nn.Module  # a Conv1D or an nn.Linear
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(fan_out, fan_in).to("meta", dtype)
            layer.weight = nn.Parameter(zero.expand(fan_in, fan_out), requires_grad=False)  # [in, out], stride 0
            layer.bias = nn.Parameter(zero.expand(fan_out), requires_grad=False)
        else:
            layer = nn.Linear(fan_in, fan_out, bias=False, device="meta", dtype=dtype)
            layer.weight = nn.Parameter(zero.expand(fan_out, fan_in), requires_grad=False)  # [out, in], stride 0
        parent.add_module(leaf, layer)
    return root


def _lora_config(config: dict, shapes: dict[str, tuple[int, int]]):
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    values = {k: v for k, v in config.items() if k in known and k not in ("peft_type", "auto_mapping")}
    if isinstance(values.get("target_modules"), str) and values["target_modules"].lower() == "all-linear":
        values["target_modules"] = sorted(shapes)  # PEFT expands all-linear on transformers models only
    values["inference_mode"] = True
    return LoraConfig(**values)


class _LoadResult(Protocol):
    """What set_peft_model_state_dict returns (torch's load_state_dict result; PEFT annotates a bare namedtuple)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _load(states: Sequence[Adapter], configs: Sequence[dict], shapes: dict, dtype: torch.dtype):
    """PEFT over a skeleton, holding adapter n as `a<n>` (loaded through PEFT's set_peft_model_state_dict)."""
    from peft import PeftModel, set_peft_model_state_dict

    model = None
    for n, (state, config) in enumerate(zip(states, configs)):
        lora = _lora_config(config, shapes)
        if model is None:
            model = PeftModel(skeleton(shapes, dtype, conv1d=lora.fan_in_fan_out), lora, adapter_name="a0")
        else:
            model.add_adapter(f"a{n}", lora)
        keys = {k if k.startswith(_PREFIX) else _PREFIX + k: v for k, v in state.items()}
        result: _LoadResult = set_peft_model_state_dict(model, keys, adapter_name=f"a{n}")
        missing = [k for k in result.missing_keys if f".a{n}." in k]
        if result.unexpected_keys or missing:
            raise UserError(
                f"adapter {n} does not fit its own target_modules: {(result.unexpected_keys or missing)[0]!r}"
            )
    return model


def merged_model(
    states: Sequence[Adapter],
    configs: Sequence[dict],
    method: str,
    weights: Sequence[float],
    density: float | None = None,
    majority_sign_method: str | None = None,
    svd_rank: int | None = None,
    seed: int = 0,
):
    """A PeftModel over the skeleton holding adapters a0..a(n-1) and PEFT's merge of them as `default`."""
    density, sign = check_options(method, density, majority_sign_method, svd_rank)
    if len(states) < 2 or len(states) != len(configs):
        raise UserError(f"merging needs at least two adapters with one config each, got {len(states)}")
    w = check_weights(weights, len(states))
    shapes = check_inputs(states, configs, method)
    dtype = next(iter(states[0].values())).dtype
    with torch.random.fork_rng(devices=[]):  # PEFT's init and DARE's drops use the global generator: fork it
        model = _load(states, configs, shapes, dtype)
        torch.manual_seed(seed)
        model.add_weighted_adapter(
            [f"a{n}" for n in range(len(states))],
            w,
            MERGED,
            combination_type=method,
            svd_rank=svd_rank,
            density=density,
            majority_sign_method=sign,
        )
    fold_rslora_scaling(model, MERGED)
    if isinstance(configs[0].get("target_modules"), str):
        model.peft_config[MERGED].target_modules = configs[0]["target_modules"]  # all-linear stays all-linear
    return model


def peft_merge(
    states: Sequence[Adapter],
    configs: Sequence[dict],
    method: str,
    weights: Sequence[float] | None = None,
    *,
    density: float | None = None,
    majority_sign_method: str | None = None,
    svd_rank: int | None = None,
    seed: int = 0,
) -> tuple[Adapter, dict]:
    """(state dict, adapter_config dict) of PEFT's `method` merge of the adapters, as PEFT would save them."""
    from peft import get_peft_model_state_dict

    weights = check_weights(weights, len(states))
    model = merged_model(states, configs, method, weights, density, majority_sign_method, svd_rank, seed)
    state = get_peft_model_state_dict(model, adapter_name=MERGED, save_embedding_layers=False)  # never asks the hub
    state = {k: v.detach().clone() for k, v in state.items()}
    config = model.peft_config[MERGED].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["peft_type"] = str(getattr(config["peft_type"], "value", config["peft_type"]))
    config["task_type"] = getattr(config.get("task_type"), "value", config.get("task_type"))
    if not all(math.isfinite(float(v.abs().max())) for v in state.values()):
        raise UserError(f"{method} merge produced NaN or inf")
    return state, config


MERGE_METHODS = ("fusion", "mixture", *PEFT_METHODS)  # every method `copra merge` and the experiments take


def merge_states(
    method: str,
    states: Sequence[Adapter],
    configs: Sequence[dict],
    weights: Sequence[float] | None = None,
    *,
    density: float | None = None,
    majority_sign_method: str | None = None,
    seed: int = 0,
) -> tuple[Adapter, dict]:
    """(merged state, its adapter_config) by copra's fusion/mixture or PEFT's `method`.

    Fusion keeps the inputs' config; mixture gets `mixture_config`; PEFT's methods give PEFT's config
    (r = lora_alpha = merged rank). `density` / `majority_sign_method` are for PEFT's methods only.
    """
    from copra.adapters.merge import MERGERS, mixture_config

    if method in MERGERS:
        if density is not None or majority_sign_method is not None:
            raise UserError(f"density and majority sign method apply to PEFT's methods, not to {method!r}")
        merged = MERGERS[method](states, weights)
        return merged, (mixture_config(configs[0], len(states)) if method == "mixture" else dict(configs[0]))
    if method not in PEFT_METHODS:
        raise UserError(f"unknown merge method {method!r}; choose one of {list(MERGE_METHODS)}")
    return peft_merge(
        states, configs, method, weights, density=density, majority_sign_method=majority_sign_method, seed=seed
    )


def setting_options(method: str, density: float) -> dict:
    """merge_states keywords for an experiment's (merge method, merge_density) setting; UserError if bad.

    Experiments carry one `merge_density` for every method; it reaches only the methods that take one.
    """
    if method not in MERGE_METHODS:
        raise UserError(f"unknown merge method {method!r}; choose one of {list(MERGE_METHODS)}")
    if method not in DENSITY_METHODS:
        return {}
    check_options(method, density, None)
    return {"density": float(density)}


def lora_scaling(config: dict) -> float:
    """PEFT's scaling of an adapter_config: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    r = config["r"]
    return config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora", False) else r)


def rescaled(state: Adapter, factor: float) -> Adapter:
    """The same adapter with every B factor times `factor` (moves an update between two scalings exactly)."""
    b_keys = {b for _, _, b in module_pairs(state)}
    return {k: (v * factor if k in b_keys else v) for k, v in state.items()}
