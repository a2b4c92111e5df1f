"""Where adapters lie (paper Sec. 3.3, Fig. 5a): t-SNE of flattened adapters, seed-to-seed similarity.

The paper's point: CopRA's adapters from different seeds are *not* closer to each other than
LoRA's, yet they merge better, so "similar weights merge well" does not explain CopRA. Here each
adapter is flattened (every A and B entry, keys in sorted order); same-method adapters of
different seeds are compared by cosine similarity and L2 distance, and all adapters are embedded in
2-D with scikit-learn's t-SNE (coloured by method, marked by learning rate or other sweep value).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from copra.utils.errors import UserError

Adapter = dict[str, torch.Tensor]


def flatten(state: Adapter) -> np.ndarray:
    """Every A and B entry of an adapter as one float64 vector (keys sorted, so adapters line up)."""
    if not state:
        raise UserError("cannot flatten an empty adapter")
    return np.concatenate([state[k].detach().double().flatten().numpy() for k in sorted(state)])


def pair_similarity(states: Sequence[Adapter]) -> dict[str, list[float]]:
    """Cosine similarity and L2 distance of every pair of (same-shaped) adapters."""
    vectors = [flatten(s) for s in states]
    if len({v.shape for v in vectors}) > 1:
        raise UserError("adapters to compare have different shapes")
    cosine, l2 = [], []
    for a, b in itertools.combinations(vectors, 2):
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        cosine.append(float(a @ b / norm) if norm > 0 else float("nan"))
        l2.append(float(np.linalg.norm(a - b)))
    return {"cosine": cosine, "l2": l2}


def tsne(states: Sequence[Adapter], seed: int = 0) -> np.ndarray:
    """2-D t-SNE coordinates [n, 2] of the flattened adapters (perplexity fitted to few points)."""
    from sklearn.manifold import TSNE

    if len(states) < 3:
        raise UserError(f"t-SNE needs at least 3 adapters, got {len(states)}")
    points = np.stack([flatten(s) for s in states])
    perplexity = float(min(30.0, max(1.0, (len(states) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
