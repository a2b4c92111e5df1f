"""Every place where copra leans on another library's behaviour beyond its plain documented calls.

Why one module: a new transformers release once broke a fresh clone by changing a private method
that the layer runner called. Public APIs come first everywhere; what is left here is either a
version switch between public APIs or the few internals with no public equivalent, each with the
versions it was checked against. `tests/test_compat.py` runs every path that is picked at run time.

Checked: the mask and gating paths on transformers 4.45-5.24, peft 0.13-0.21, torch 2.13-2.14
(`make test-lowest`, `make test-latest`); `fold_rslora_scaling` on peft 0.21 only (its test fails on 0.13).
Flower: copra.federated.simulation subclasses FedAvg through its documented `aggregate_train` hook and reads
back only the constructor's own arguments (`weighted_by_key`, `train_metrics_aggr_fn`); the one internal is the
clipping and noise scale of Flower's server-side DP wrapper (`flower_fixed_clipping`, flwr 1.41-1.42).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

MaskBuilder = Callable[[torch.Tensor, torch.Tensor], Any]


# -- transformers: which attention kernels an architecture has ----------------------------------------
def supported_attention(path: str, preferred: str) -> str:
    """`preferred` if the architecture at `path` has that kernel, else "eager" (MPNet has no SDPA).

    transformers has no public "does this class support SDPA" query: it raises on load instead. The
    class flag `_supports_sdpa` (checked on transformers 4.45-5.24) answers before loading; any
    failure to read it keeps `preferred`, and from_pretrained then says what is wrong.
    """
    if preferred != "sdpa":
        return preferred
    from transformers import MODEL_MAPPING, AutoConfig

    try:
        model_class = MODEL_MAPPING[type(AutoConfig.from_pretrained(path))]
    except (KeyError, OSError, ValueError):
        return preferred
    return preferred if getattr(model_class, "_supports_sdpa", True) else "eager"


def additive_mask(model: nn.Module) -> bool:
    """Whether `model`'s attention adds a custom 4D mask to its scores (eager: 0 / -inf floats) rather
    than taking it as a bool (SDPA: True = attend). transformers passes a 4D mask through unchanged
    (`masking_utils`, 4.45-5.24) and names the kernel only in the private `config._attn_implementation`.
    """
    return getattr(getattr(model, "config", None), "_attn_implementation", "eager") == "eager"


# -- transformers: the attention mask an encoder block takes -----------------------------------------
def bidirectional_mask_builder(model: nn.Module) -> MaskBuilder | None:
    """`(hidden [B, T, H], mask [B, T]) -> block mask` through transformers' public mask API.

    transformers >= 4.56: `masking_utils.create_bidirectional_mask` (the function BertModel itself
    calls, so the mask has the form its attention implementation expects; None when nothing is
    padded and the implementation allows it). Older releases: None, see `legacy_mask_builder`.
    """
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers < 4.56
        return None
    config = model.config
    return lambda hidden, mask: create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)


def legacy_mask_builder(model: nn.Module) -> MaskBuilder | None:
    """transformers < 4.56: the additive [B, 1, 1, T] mask of `ModuleUtilsMixin.get_extended_attention_mask`."""
    extended = getattr(model, "get_extended_attention_mask", None)
    if not callable(extended):
        return None
    return lambda hidden, mask: extended(mask, tuple(mask.shape))


def attention_mask_builder(model: nn.Module) -> MaskBuilder | None:
    """The newest public mask builder this transformers has for `model`, or None."""
    return bidirectional_mask_builder(model) or legacy_mask_builder(model)


# -- peft: switching one LoRA layer off for a single forward ----------------------------------------------
def switch_adapters_off(module: nn.Module) -> list[tuple[torch.nn.Parameter, bool]]:
    """PEFT's tuner layer `module` runs its base layer only until `switch_adapters_on(module)`.

    For forward pre-/post-hook pairs. Uses the public `BaseTunerLayer.enable_adapters` (peft >= 0.13),
    which also flips requires_grad of the adapter weights; the flags are saved (and returned) so the
    second half puts them back exactly: a frozen (inference) adapter stays frozen, a trainable one
    trainable. A layer the user already disabled is left alone (nothing saved, nothing restored).
    """
    tuner = cast("BaseTunerLayer", module)  # as said above; a forward hook's hot path, so no runtime check
    if tuner.disable_adapters:
        return []
    saved = [(p, p.requires_grad) for name, p in module.named_parameters() if not name.startswith("base_layer.")]
    module.__dict__["_copra_requires_grad"] = saved
    tuner.enable_adapters(False)
    return saved


def switch_adapters_on(module: nn.Module) -> None:
    """Second half: adapters on again, requires_grad flags as `switch_adapters_off` found them."""
    saved = module.__dict__.pop("_copra_requires_grad", None)
    if saved is None:
        return
    cast("BaseTunerLayer", module).enable_adapters(True)  # switch_adapters_off saved flags for it: a tuner layer
    for param, flag in saved:
        param.requires_grad_(flag)


# -- torch: computing a frozen module's output once for one input tensor ---------------------------------
def tensor_version(tensor: torch.Tensor) -> int:
    """Autograd's in-place version counter (`Tensor._version`, no public name; torch >= 1.0)."""
    return tensor._version


@contextmanager
def memoized_forward(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Inside, each module returns its last output again when called again on the very same,
    unmodified input tensor (one positional argument, nothing else); outside, it is untouched.

    Identity plus the version counters of input and output guard against any in-place change.
    The forward is replaced by an instance attribute (removed on exit): nn.Module.__call__ looks
    `forward` up on the instance, a behaviour of every torch release. A module whose forward is
    already an instance attribute is left alone.
    """
    patched = []
    for module in modules:
        if "forward" in vars(module):
            continue
        original = module.forward
        # "last": (x, its version counter, the output, its version counter)
        memo: dict[str, tuple[torch.Tensor, int, torch.Tensor, int]] = {}

        def forward(x, *args, _original=original, _memo=memo, **kwargs):
            if args or kwargs or not isinstance(x, torch.Tensor):
                return _original(x, *args, **kwargs)
            last = _memo.get("last")
            if (
                last is not None
                and last[0] is x
                and last[1] == tensor_version(x)
                and last[3] == tensor_version(last[2])
            ):
                return last[2]
            out = _original(x)
            _memo["last"] = (x, tensor_version(x), out, tensor_version(out))
            return out

        module.forward = forward
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


# -- transformers: locating a file of a checkpoint ------------------------------------------------------
def checkpoint_file(path: str, filename: str) -> str | None:
    """Local path of `filename` in a model folder or hub cache, or None when it has none.

    `transformers.utils.cached_file` without its private `_raise_exceptions_*` keywords: a missing
    file or an unreachable hub is an OSError (transformers 4.45-5.24), read here as "none".
    """
    from transformers.utils import cached_file

    try:
        return cached_file(path, filename)
    except (OSError, ValueError):
        return None


# -- peft: add_weighted_adapter's merged scaling with rsLoRA -----------------------------------------------
def fold_rslora_scaling(peft_model: PeftModel, adapter_name: str) -> bool:
    """Make the merged adapter `adapter_name` scale by 1, as `add_weighted_adapter` means it to; True if changed.

    `add_weighted_adapter` folds every input's scaling into the merged factors and sets r = lora_alpha
    so the merged scaling is 1, but it copies `use_rslora` from the first input, and with rsLoRA the
    scaling is alpha / sqrt(r) = sqrt(r): the update comes out sqrt(r) times too large (peft 0.21.2;
    huggingface/peft#3449, #3761). Turning rsLoRA off on the merged adapter's config (and scaling, via
    the public `set_scale`) gives the update PEFT computed. A no-op where PEFT already did so.
    """
    from peft.tuners.lora import LoraConfig, LoraLayer

    config = peft_model.peft_config[adapter_name]
    if not getattr(config, "use_rslora", False):
        return False
    assert isinstance(config, LoraConfig)  # the only PEFT config with use_rslora
    scaling = config.lora_alpha / config.r**0.5
    if abs(scaling - 1.0) < 1e-12:
        return False
    config.use_rslora = False
    config.lora_alpha = config.r
    for module in peft_model.modules():
        scaling = getattr(module, "scaling", None)  # a LoRA layer's dict (attention modules have a float)
        if isinstance(scaling, dict) and adapter_name in scaling and hasattr(module, "set_scale"):
            assert isinstance(module, LoraLayer)  # it holds the LoRA adapter `adapter_name`
            # set_scale(s) gives s * alpha / sqrt(r) under the layer's rsLoRA flag: choose s for scaling 1
            module.set_scale(adapter_name, module.r[adapter_name] ** 0.5 / module.lora_alpha[adapter_name])
    return True


# -- flwr: server-side fixed clipping of differential privacy ----------------------------------------
def flower_fixed_clipping(
    replies: Sequence[list[Any]], start: list[Any], clip_norm: float, noise_multiplier: float
) -> tuple[list[list[Any]], float]:
    """(each reply as start + its update clipped to L2 norm `clip_norm`, the std of the noise for their mean).

    What `flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping.aggregate_train` (public) does
    before and after it averages, through the functions it calls: `compute_clip_model_update` and
    `compute_stdv` (noise_multiplier * clip_norm / len(replies)) of the internal
    `flwr.supercore.differential_privacy` (identical in flwr 1.41 and 1.42; `flwr.common.differential_privacy`
    in 1.30). copra cannot hand its replies to the wrapper itself (copra.federated.privacy says why).
    Arrays are lists of numpy arrays in one key order. Flower divides by the update's norm, so a zero
    update is passed through unchanged rather than to a ZeroDivisionError.
    """
    import numpy as np
    from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv

    clipped = []
    for reply in replies:
        arrays = list(reply)
        if any(np.any(a != s) for a, s in zip(arrays, start)):
            compute_clip_model_update(arrays, list(start), clip_norm)  # arrays[i] = start[i] + clipped update
        clipped.append(arrays)
    return clipped, compute_stdv(noise_multiplier, clip_norm, len(replies))


# -- warnings from other libraries that are not the user's concern ----------------------------------
# peft 0.17-0.21 calls `is_gradient_checkpointing`, which transformers 5 deprecates.
KNOWN_WARNINGS = (("`is_gradient_checkpointing` is deprecated", FutureWarning),)


def quiet_known_warnings() -> None:
    """Hide the warnings in KNOWN_WARNINGS (matched by message text, so they live here only)."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


__all__ = [
    "KNOWN_WARNINGS",
    "attention_mask_builder",
    "bidirectional_mask_builder",
    "checkpoint_file",
    "flower_fixed_clipping",
    "legacy_mask_builder",
    "memoized_forward",
    "quiet_known_warnings",
    "switch_adapters_off",
    "switch_adapters_on",
    "tensor_version",
]
