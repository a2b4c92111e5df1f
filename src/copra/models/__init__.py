"""Backbones with PEFT LoRA attached, as head-free prompt classifiers.

`build_classifier(config)` picks the builder by `config.backbone`: "text" (the embedded sentence
encoder) or "clip" (HF CLIPModel, the paper's setting).
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


BUILDERS: dict[str, Callable[[TrainConfig], nn.Module]] = {"text": _build_text, "clip": _build_clip}


def build_classifier(config: TrainConfig) -> nn.Module:
    """A classifier whose `.encoder` is a PeftModel with fresh LoRA adapters (seeded by the caller).

    In `config.precision` (resolved for this machine, `.precision` on the classifier): for bf16/fp16
    the frozen Linear weights are cast once and the classifier runs its forwards under autocast.
    """
    from copra.utils.precision import cast_frozen, resolve

    precision = resolve(config.precision)
    classifier = BUILDERS[config.backbone](config)
    classifier.precision = precision
    cast_frozen(classifier.encoder, precision)
    return classifier
