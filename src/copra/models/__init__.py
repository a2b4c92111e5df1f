"""Backbones with PEFT LoRA attached, as head-free prompt classifiers.

`build_classifier(config)` picks the builder by `config.backbone`: "text" (the embedded sentence
encoder), "clip" (HF CLIPModel, the paper's setting) or "causal" (a decoder LLM scoring each class's
answer, `copra.models.causal`). Each classifier offers the same scoring methods, so training,
evaluation, merging and pruning never ask which one they have.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from copra.core.config import TrainConfig


def _build_text(config: TrainConfig) -> nn.Module:
    from copra.models.text import build_text_classifier

    return build_text_classifier(config)


def _build_clip(config: TrainConfig) -> nn.Module:
    from copra.models.clip import build_clip_classifier

    return build_clip_classifier(config)


def _build_causal(config: TrainConfig) -> nn.Module:
    from copra.models.causal import build_causal_classifier

    return build_causal_classifier(config)


BUILDERS: dict[str, Callable[[TrainConfig], nn.Module]] = {
    "text": _build_text,
    "clip": _build_clip,
    "causal": _build_causal,
}


def build_classifier(config: TrainConfig) -> nn.Module:
    """A classifier whose `.encoder` is a PeftModel with fresh LoRA adapters (seeded by the caller).

    In `config.precision` (resolved for this machine, `.precision` on the classifier): for bf16/fp16
    the frozen Linear weights are cast once and the classifier runs its forwards under autocast.
    """
    from copra.models.base_model import EMBEDDED
    from copra.utils.errors import UserError
    from copra.utils.precision import cast_frozen, resolve

    embedded = EMBEDDED.get(config.model)
    if embedded is not None and embedded.backbone != config.backbone:
        presets = {"causal": "smollm2", "text": "minilm or mpnet"}
        raise UserError(
            f"{config.model} is a {embedded.backbone} model: set backbone={embedded.backbone} "
            f"(preset {presets.get(embedded.backbone, embedded.backbone)}), not {config.backbone}"
        )
    precision = resolve(config.precision)
    classifier = BUILDERS[config.backbone](config)
    classifier.precision = precision
    cast_frozen(classifier.encoder, precision)
    return classifier
