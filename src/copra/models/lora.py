"""Attaching PEFT LoRA to a backbone, with CopRA's run settings."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from copra.config import TrainConfig
from copra.errors import UserError


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
    return get_peft_model(backbone, lora_config(config))
