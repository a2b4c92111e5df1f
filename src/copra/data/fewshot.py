"""Seeded few-shot training subsets and fixed, class-balanced evaluation subsets.

Why: CopRA runs are compared across seeds and methods, so the k-shot training set must be a pure
function of (labels, shots, seed) -- different seeds give different draws, the same seed gives the
same draw on every machine -- while the evaluation subset must *not* move with the run seed, or
differences between runs would mix up model variance with test-set variance. Both functions work
on label lists only and return indices into them; ``random.Random`` with an explicit seed keeps
them independent of global random state.
"""

from __future__ import annotations

import random
from typing import Sequence

from copra.errors import UserError


def _class_members(labels: Sequence[int], num_classes: int | None) -> list[list[int]]:
    """Indices of each class 0..num_classes-1 (num_classes defaults to max(label) + 1)."""
    if len(labels) == 0:
        raise UserError("no labels given: the split is empty")
    n = max(labels) + 1 if num_classes is None else num_classes
    members: list[list[int]] = [[] for _ in range(n)]
    for i, y in enumerate(labels):
        if not 0 <= y < n:
            raise UserError(f"label {y} at index {i} is outside 0..{n - 1}")
        members[y].append(i)
    return members


def few_shot_indices(labels: Sequence[int], shots: int, seed: int, num_classes: int | None = None) -> list[int]:
    """Exactly ``shots`` indices per class, drawn with ``seed``; sorted ascending.

    Every class 0..num_classes-1 must have at least ``shots`` examples, otherwise the UserError names
    the class id, its size and the number of shots asked for.
    """
    if shots < 1:
        raise UserError(f"shots must be >= 1, got {shots}")
    members = _class_members(labels, num_classes)
    for c, idx in enumerate(members):
        if len(idx) < shots:
            raise UserError(f"class {c} has only {len(idx)} training examples, fewer than shots={shots}")
    rng = random.Random(seed)
    chosen: list[int] = []
    for idx in members:
        chosen += rng.sample(idx, shots)
    return sorted(chosen)


def _balanced_counts(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` over classes as evenly as their sizes allow (water filling)."""
    counts = [0] * len(sizes)
    left = total
    open_classes = [c for c, s in enumerate(sizes) if s > 0]
    while left > 0 and open_classes:
        share = max(1, left // len(open_classes))
        for c in list(open_classes):
            if left == 0:
                break
            take = min(share, sizes[c] - counts[c], left)
            counts[c] += take
            left -= take
            if counts[c] == sizes[c]:
                open_classes.remove(c)
    return counts


def eval_indices(labels: Sequence[int], max_examples: int | None, seed: int = 0) -> list[int]:
    """A fixed subsample of at most ``max_examples`` indices, as class-balanced as the sizes allow.

    Depends only on (labels, max_examples, seed) -- pass a fixed ``seed``, not the run seed. ``None``
    (or a cap at least the split size) returns every index. Sorted ascending.
    """
    if max_examples is None or max_examples >= len(labels):
        return list(range(len(labels)))
    if max_examples < 1:
        raise UserError(f"max_examples must be >= 1 or None, got {max_examples}")
    members = _class_members(labels, None)
    counts = _balanced_counts([len(m) for m in members], max_examples)
    rng = random.Random(f"eval-{seed}")
    chosen: list[int] = []
    for idx, k in zip(members, counts):
        chosen += rng.sample(idx, k)
    return sorted(chosen)


def validation_indices(labels: Sequence[int], exclude: Sequence[int], max_examples: int | None,
                       seed: int = 0) -> list[int]:
    """A class-balanced subsample of the indices not in ``exclude`` (the run's few-shot training set).

    Why: choices made from adapter scores (which layers to keep) must be made on data the adapter was
    not trained on and the test split never sees; the rest of the training pool is that data.
    """
    taken = set(exclude)
    rest = [i for i in range(len(labels)) if i not in taken]
    if not rest:
        raise UserError("no training examples are left for a validation split after the few-shot sample")
    chosen = eval_indices([labels[i] for i in rest], max_examples, seed=seed)
    return [rest[i] for i in chosen]
