"""Few-shot data for one run, and accuracy of a prompt classifier on a fixed evaluation set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from copra.config import TrainConfig


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
    from copra.data.fewshot import eval_indices, few_shot_indices

    if config.backbone == "clip":
        from copra.data.coop import load_coop_task

        task = load_coop_task(config.data_root, config.task)
    else:
        from copra.data.text_tasks import load_task

        task = load_task(config.task)
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


def _examples(task, split: str) -> Sequence[Any]:
    # text tasks name them *_texts, image tasks *_images
    return getattr(task, f"{split}_texts", None) or getattr(task, f"{split}_images")


@torch.no_grad()
def predict(classifier: nn.Module, examples: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
    """Predicted class ids for `examples`, in eval mode (every adapter on unless a mask is set)."""
    was_training = classifier.training
    classifier.eval()
    try:
        device = next(classifier.parameters()).device
        class_embeddings = classifier.class_embeddings()  # [C, H], once for all batches
        predictions = []
        for start in range(0, len(examples), batch_size):
            inputs = classifier.inputs_for(list(examples[start : start + batch_size]))
            embedded = classifier.embed(**{k: v.to(device) for k, v in inputs.items()})  # [B, H]
            predictions.append((embedded @ class_embeddings.T).argmax(-1).cpu())
        return torch.cat(predictions)
    finally:
        classifier.train(was_training)


def accuracy(classifier: nn.Module, examples: Sequence[Any], labels: Sequence[int], batch_size: int = 64) -> float:
    """Fraction of `examples` classified correctly (0..1)."""
    predicted = predict(classifier, examples, batch_size)
    return float((predicted == torch.tensor(list(labels))).float().mean())
