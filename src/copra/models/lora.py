"""Attaching PEFT LoRA to a backbone, with CopRA's run settings."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from copra.core.config import TrainConfig
from copra.models.base_model import hub_name
from copra.utils.errors import UserError


def lora_config(config: TrainConfig) -> LoraConfig:
    """PEFT LoraConfig from a run config (CLIP-LoRA defaults: r=2, alpha=1, dropout 0.25, rsLoRA)."""
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        target_modules=list(config.target_modules),
        bias="none",
        # a decoder LLM's adapter says so, for PEFT's AutoPeftModelForCausalLM and TRL
        task_type="CAUSAL_LM" if config.backbone == "causal" else None,
    )


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every nn.Dropout of the frozen backbone to p (before LoRA is attached).

    CLIP has no dropout; the embedded BERT has 0.1. With 0 the backbone is deterministic, so
    "all adapters on" in training equals plain LoRA and only LoRA's own dropout regularises.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def attach_lora(backbone: nn.Module, config: TrainConfig) -> PeftModel:
    """Wrap `backbone` with fresh LoRA adapters (B = 0, so it starts as the zero-shot model)."""
    set_dropout(backbone, config.backbone_dropout)
    present = {name.rsplit(".", 1)[-1] for name, _ in backbone.named_modules()}
    missing = [m for m in config.target_modules if m not in present]
    if missing:
        raise UserError(f"target module {missing[0]!r} is not in the model {type(backbone).__name__}")
    model = get_peft_model(backbone, lora_config(config))
    # PEFT records the local folder the backbone came from; saved adapters name a portable base instead
    model.peft_config["default"].base_model_name_or_path = hub_name(config.model)
    swap_lora_dropout(model)
    return model


class BitsDropout(nn.Module):
    """nn.Dropout's law from bulk random bits: each element kept with probability 1-p, scaled by 1/(1-p).

    Why: on the CPU, PEFT's LoRA dropout (`bernoulli_`, one float mask per q/k/v input) took about a
    quarter of a bf16 training step. Here one `random_` over int64 words gives 8, 4 or 2 uniform
    integers per word (8-, 16- or 32-bit lanes), and an element is kept when its lane is below
    round((1-p) 2^bits): exactly Bernoulli(1-p) when p is a multiple of 2^-bits (8 bits for
    CLIP-LoRA's 0.25), otherwise within 2^-33. Draws come from torch's global generator, which
    checkpoints save, so resumed runs draw the same masks.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p, self.inplace = float(p), inplace  # nn.Dropout's attributes (inplace is not used)
        self.bits = next(b for b in (8, 16, 32) if b == 32 or float(p * 2**b).is_integer())
        # kept when the signed lane value < threshold (lanes are uniform on [-2^(bits-1), 2^(bits-1)))
        self.threshold = round((1.0 - p) * 2**self.bits) - 2 ** (self.bits - 1)

    def keep_mask(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """A bool tensor of `shape`, each entry True with probability 1-p."""
        count = shape.numel()
        lanes = 64 // self.bits
        words = torch.empty((count + lanes - 1) // lanes, dtype=torch.int64, device=device).random_(-(2**63), None)
        values = words.view(_LANE_DTYPES[self.bits])[:count].view(shape)
        return values < self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        scale = self.keep_mask(x.shape, x.device).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * scale

    def extra_repr(self) -> str:
        return f"p={self.p}, bits={self.bits}"


_LANE_DTYPES = {8: torch.int8, 16: torch.int16, 32: torch.int32}


def swap_lora_dropout(model: nn.Module) -> int:
    """Replace every nn.Dropout in PEFT's `lora_dropout` ModuleDicts with a BitsDropout of the same p."""
    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name, dropout in list(dropouts.items()):
                if type(dropout) is nn.Dropout:
                    dropouts[name] = BitsDropout(dropout.p)
                    count += 1
    return count
