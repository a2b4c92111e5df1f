"""Seeded few-shot training subsets, fixed class-balanced evaluation subsets, and a run's data.

Why: CopRA runs are compared across seeds and methods, so the k-shot training set must be a pure
function of (labels, shots, seed) -- different seeds give different draws, the same seed gives the
same draw on every machine -- while the evaluation subset must *not* move with the run seed, or
differences between runs would mix up model variance with test-set variance. The index functions
work on label lists only and return indices into them; ``random.Random`` with an explicit seed keeps
them independent of global random state. `prepare_data` / `prepare_validation` apply them to a
configured task and return the run's `FewShotData` (re-exported by `copra.models.evaluation`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from copra.utils.errors import UserError

if TYPE_CHECKING:  # annotations only: copra.data stays free of torch
    from copra.core.config import TrainConfig


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


def validation_indices(labels: Sequence[int], exclude: Sequence[int], max_examples: int, seed: int = 0) -> list[int]:
    """A class-balanced subset of at most ``max_examples`` indices of a training pool, none in ``exclude``.

    Why: hyperparameters (the lr of each method) are picked on examples the run does not train on and
    the final evaluation never sees: the training pool minus the run's few-shot sample (``exclude``).
    Depends only on (labels, exclude, max_examples, seed). Sorted ascending.
    """
    if max_examples < 1:
        raise UserError(f"validation examples must be >= 1, got {max_examples}")
    excluded = set(exclude)
    members = [[i for i in idx if i not in excluded] for idx in _class_members(labels, None)]
    counts = _balanced_counts([len(m) for m in members], max_examples)
    rng = random.Random(f"validation-{seed}")
    chosen: list[int] = []
    for idx, k in zip(members, counts):
        chosen += rng.sample(idx, k)
    if not chosen:
        raise UserError("no training examples are left for a validation split")
    return sorted(chosen)


@dataclass(frozen=True)
class FewShotData:
    """What a run trains and evaluates on: k shots per class and a fixed evaluation subset."""

    task: str
    class_names: tuple[str, ...]
    prompts: tuple[str, ...]
    train_x: tuple[Any, ...]  # texts, or image paths for CLIP
    train_y: tuple[int, ...]
    eval_x: tuple[Any, ...]
    eval_y: tuple[int, ...]


def prepare_data(config: TrainConfig) -> FewShotData:
    """Load the task and draw the run's few-shot sample (seeded) and the fixed evaluation subset."""
    task = _load(config)
    counts = [0] * task.num_classes
    for y in task.train_labels:
        counts[y] += 1
    for c, n in enumerate(counts):
        if n < config.shots:
            raise UserError(
                f"task {task.name!r}: class {task.class_names[c]!r} has only {n} training examples, "
                f"fewer than shots={config.shots}"
            )
    train = few_shot_indices(task.train_labels, config.shots, config.seed, task.num_classes)
    held_out = eval_indices(task.test_labels, config.eval_examples)
    return FewShotData(
        task=task.name,
        class_names=tuple(task.class_names),
        prompts=tuple(task.prompts()),
        train_x=tuple(_examples(task, "train")[i] for i in train),
        train_y=tuple(task.train_labels[i] for i in train),
        eval_x=tuple(_examples(task, "test")[i] for i in held_out),
        eval_y=tuple(task.test_labels[i] for i in held_out),
    )


def prepare_validation(config: TrainConfig, examples: int = 200) -> FewShotData:
    """The run's few-shot sample (as `prepare_data`) with a validation set in place of the evaluation set.

    The validation set is carved from the task's *training* pool: class-balanced, at most `examples`,
    never the run's few-shot sample, and never an example that also appears in the test split (a
    pool may hold duplicates), so choosing hyperparameters on it cannot see the test split.
    """
    data = prepare_data(config)
    return _with_validation(data, config, set(data.train_x), examples, seed=config.seed)


def prepare_shared_validation(configs: Sequence[TrainConfig], examples: int = 200) -> FewShotData:
    """One validation set for runs that are compared or merged with each other (seeds, methods, cells).

    As `prepare_validation`, but the excluded examples are the union of every run's few-shot sample,
    and the draw does not depend on any run's seed: every run of one task is scored on the same
    examples, so per-example outcomes pair up across seeds and methods (a paired bootstrap needs that),
    and no run is scored on an example another run of the merge trained on.
    """
    if not configs:
        raise UserError("a shared validation set needs at least one run")
    tasks = {c.task for c in configs}
    if len(tasks) != 1:
        raise UserError(f"a shared validation set is for runs of one task, got {sorted(tasks)}")
    data = prepare_data(configs[0])
    trained = set(data.train_x).union(*(prepare_data(c).train_x for c in configs[1:]))
    return _with_validation(data, configs[0], trained, examples, seed=0)


def _with_validation(data: FewShotData, config: TrainConfig, trained: set, examples: int, seed: int) -> FewShotData:
    """`data` with a validation set in place of its evaluation set: from the training pool, none of `trained`
    and none of the test split (a pool may hold duplicates)."""
    task = _load(config)
    pool, labels = _examples(task, "train"), task.train_labels
    test = set(_examples(task, "test"))
    exclude = [i for i, x in enumerate(pool) if x in trained or x in test]
    chosen = validation_indices(labels, exclude, examples, seed=seed)
    return replace(data, eval_x=tuple(pool[i] for i in chosen), eval_y=tuple(labels[i] for i in chosen))


def _load(config: TrainConfig):
    """The task a run names: CoOp images for CLIP, else a built-in text task or the user's file."""
    if config.backbone == "clip":
        from copra.data.coop import load_coop_task

        return load_coop_task(config.data_root, config.task)
    from copra.data.user_files import text_task

    return text_task(config.task, config.test_file, config.text_column, config.label_column, config.prompt)


def _examples(task, split: str) -> Sequence[Any]:
    # text tasks name them *_texts, image tasks *_images
    return getattr(task, f"{split}_texts", None) or getattr(task, f"{split}_images")
