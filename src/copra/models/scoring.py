"""Class scores of a head-free prompt classifier: one definition for the text and the CLIP classifier.

Both classify an example by the cosine between its unit-norm embedding and each class prompt's
(CLIP-LoRA's rule). Training reads `forward` (logits = scale * cosine, for the cross-entropy);
evaluation, the coalition evaluator and Flower read `scores` (the cosines; their argmax is the
prediction) through `copra.models.evaluation`. The arithmetic of each is written once, here:

    scores = embedded @ classes.T            [B, C]
    logits = scale * embedded @ classes.T    (scale * embedded first, as training always computed it)

The prediction is taken from the cosines, not the logits: multiplying by a scale that is not a
power of two can round two close cosines to one logit and so change an argmax on a tie.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class PromptScoring:
    """Mixin for an nn.Module with `embed(**inputs)`, `class_embeddings()` and `scale`."""

    scale: float

    def scores(self, inputs: dict[str, Any], classes: torch.Tensor | None = None) -> torch.Tensor:
        """Cosines [B, C] of a collated batch (`inputs_for`) with the class prompts (`classes`: [C, H], or
        embedded now); the argmax is the predicted class."""
        return self.scores_of(self.embed_batch(inputs), classes)

    def logits(self, inputs: dict[str, Any], classes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C] of a collated batch, as `forward` computes them (for a loss)."""
        return self.logits_of(self.embed_batch(inputs), classes)

    def embed_batch(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Unit-norm embeddings [B, H] of a collated batch, moved to the model's device."""
        device = next(self.parameters()).device
        return self.embed(**{k: v.to(device) for k, v in inputs.items()})

    def scores_of(self, embedded: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Cosines [B, C] of unit-norm embeddings [B, H] with the class prompts."""
        classes = self.class_embeddings() if classes is None else classes
        return embedded @ classes.T

    def logits_of(self, embedded: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C] (scale * cosine) of unit-norm embeddings: what the cross-entropy reads."""
        classes = self.class_embeddings() if classes is None else classes
        return self.scale * embedded @ classes.T


__all__ = ["PromptScoring"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states that are not padding (sentence-transformers' pooling)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # [B, H]


def sentence_embedding(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Unit-norm fp32 sentence embeddings [B, H] from the last hidden state [B, T, H] (any precision)."""
    return F.normalize(mean_pool(hidden.float(), attention_mask), dim=-1)
