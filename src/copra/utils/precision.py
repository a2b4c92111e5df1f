"""Numeric precision of a run: bf16 autocast where the hardware has it, fp32 master weights always.

Why: a training step of the embedded encoder is GEMM-bound, and a CPU with AVX512-BF16 (or AMX)
runs bf16 matmuls ~4x faster than fp32 ones; GPUs have tensor cores for bf16/fp16. So the frozen
backbone's Linear weights are cast to bf16 once (`cast_frozen`: autocast would otherwise recast
them on every forward) and every forward runs under `torch.autocast`; adapter weights, their
gradients, AdamW's state and everything saved stay fp32 (autocast casts the fp32 adapters on the
fly, and their gradients come back fp32). Pooling, the cosine logits and the loss are fp32.

`torch.autocast` is used directly rather than Accelerate's `mixed_precision`: Accelerate keeps one
process-wide state that cannot change after the first `Accelerator`, and a process here trains
runs of both precisions (benchmarks, tests, experiments comparing them).

Choices (`TrainConfig.precision`): "auto" = bf16 where supported (`bf16_supported`), else fp32;
"fp32"; "bf16"; "fp16" (CUDA only, with a gradient scaler).
"""

from __future__ import annotations

import contextlib
import functools
import platform
from contextlib import AbstractContextManager

import torch
from torch import nn

from copra.utils.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags (Linux /proc/cpuinfo) that mean native bf16 arithmetic: x86 AVX512-BF16 / AMX, Arm BF16
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def default_device_type() -> str:
    """Where a run trains: "cuda" when a GPU is visible (as Accelerate picks), else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def bf16_supported(device_type: str = "cpu") -> bool:
    """Whether `device_type` computes bf16 natively (fast), not by emulation.

    CUDA: torch's public `torch.cuda.is_bf16_supported()`. CPU: torch has no public query, so the
    CPU's feature flags are read (Linux); elsewhere (macOS, Windows) the answer is False -> fp32.
    A tiny autocast matmul then checks that this torch build runs bf16 on the CPU at all.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu" or not _cpu_flags().intersection(_BF16_FLAGS):
        return False
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.ones(4, 4) @ torch.ones(4, 4)
        return out.dtype == torch.bfloat16 and bool((out == 4).all())
    except RuntimeError:
        return False


def _cpu_flags() -> set[str]:
    if platform.system() != "Linux":
        return set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):  # x86 / Arm
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def resolve(precision: str, device_type: str | None = None) -> str:
    """The precision a run really uses on `device_type`: "fp32", "bf16" or "fp16" (UserError if impossible)."""
    device_type = device_type or default_device_type()
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_supported(device_type) else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise UserError("precision fp16 needs a CUDA GPU (use bf16 or fp32 on the CPU)")
    return precision


def autocast(precision: str, device_type: str = "cpu") -> AbstractContextManager:
    """`torch.autocast` for a resolved precision; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[precision])


def autocast_of(module: nn.Module, device: torch.device | str | None = None) -> AbstractContextManager:
    """The autocast of a classifier built by `copra.models.build_classifier` (its `.precision`)."""
    precision = getattr(module, "precision", "fp32")
    if precision == "fp32":
        return contextlib.nullcontext()
    if device is None:
        device = next(module.parameters()).device
    return autocast(precision, torch.device(device).type)


def cast_frozen(model: nn.Module, precision: str) -> int:
    """Cast the weights of frozen nn.Linear layers (the backbone's) to the low precision, once.

    Only Linear layers whose parameters are all frozen: LoRA's A/B (trainable) stay fp32, and so do
    embeddings and LayerNorms (cheap, and more accurate in fp32). Every forward must then run under
    `autocast` (a bf16 weight does not multiply an fp32 input). Returns the number of layers cast.
    """
    if precision == "fp32":
        return 0
    dtype, count = DTYPES[precision], 0
    for name, module in model.named_modules():
        if type(module) is nn.Linear and "lora_" not in name and not any(p.requires_grad for p in module.parameters()):
            module.to(dtype)
            count += 1
    return count


# attention kernel per precision, measured on the embedded encoder (benchmarks/step_time.py, 2 CPU threads):
# under bf16 the eager softmax(QK^T)V is faster than SDPA's CPU flash-attention backward
ATTENTION = {"fp32": "sdpa", "bf16": "eager", "fp16": "sdpa"}


def attention_implementation(precision: str) -> str:
    """transformers' `attn_implementation` for a resolved precision (see ATTENTION)."""
    return ATTENTION[precision]


def grad_scaler(precision: str, device_type: str):
    """A `torch.amp.GradScaler` for fp16 (its small range underflows gradients), else None."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device_type)


__all__ = [
    "ATTENTION",
    "DTYPES",
    "PRECISIONS",
    "attention_implementation",
    "autocast",
    "autocast_of",
    "bf16_supported",
    "cast_frozen",
    "default_device_type",
    "grad_scaler",
    "resolve",
]
