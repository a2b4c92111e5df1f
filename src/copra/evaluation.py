"""Few-shot data for one run, and accuracy of a prompt classifier on a fixed evaluation set."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn

from copra.config import TrainConfig
from copra.errors import UserError


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
        from copra.data.user_files import text_task

        task = text_task(config.task, config.test_file, config.text_column, config.label_column, config.prompt)
    counts = [0] * task.num_classes
    for y in task.train_labels:
        counts[y] += 1
    for c, n in enumerate(counts):
        if n < config.shots:
            raise UserError(f"task {task.name!r}: class {task.class_names[c]!r} has only {n} training examples, "
                            f"fewer than shots={config.shots}")
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
    from copra.data.fewshot import validation_indices

    data = prepare_data(config)
    task = _load(config)
    pool, labels = _examples(task, "train"), task.train_labels
    trained = set(data.train_x)
    test = set(_examples(task, "test"))
    exclude = [i for i, x in enumerate(pool) if x in trained or x in test]
    chosen = validation_indices(labels, exclude, examples, seed=config.seed)
    return replace(data, eval_x=tuple(pool[i] for i in chosen), eval_y=tuple(labels[i] for i in chosen))


def _load(config: TrainConfig):
    """The task's splits (text tasks are cached by `load_task`)."""
    if config.backbone == "clip":
        from copra.data.coop import load_coop_task

        return load_coop_task(config.data_root, config.task)
    from copra.data.text_tasks import load_task

    return load_task(config.task)


def _examples(task, split: str) -> Sequence[Any]:
    # text tasks name them *_texts, image tasks *_images
    return getattr(task, f"{split}_texts", None) or getattr(task, f"{split}_images")


def predict(classifier: nn.Module, examples: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
    """Predicted class ids for `examples`, in eval mode (every adapter on unless a mask is set).

    Runs under `torch.inference_mode` in the classifier's precision; batches are formed in order of
    input length (`length_order`), so each is padded only to a similar length.
    """
    was_training = classifier.training
    classifier.eval()
    try:
        with torch.inference_mode():
            device = next(classifier.parameters()).device
            class_embeddings = classifier.class_embeddings()  # [C, H], once for all batches
            order = length_order(classifier, examples)
            predicted = torch.empty(len(examples), dtype=torch.long)
            for start in range(0, len(examples), batch_size):
                rows = order[start : start + batch_size]
                inputs = classifier.inputs_for([examples[i] for i in rows])
                embedded = classifier.embed(**{k: v.to(device) for k, v in inputs.items()})  # [B, H]
                predicted[rows] = (embedded @ class_embeddings.T).argmax(-1).cpu()
            return predicted
    finally:
        classifier.train(was_training)


def length_order(classifier: nn.Module, examples: Sequence[Any]) -> list[int]:
    """Indices of `examples` from shortest to longest input (stable); as given if lengths are unknown (images)."""
    length = getattr(classifier, "input_length", None)
    if length is None:
        return list(range(len(examples)))
    return sorted(range(len(examples)), key=lambda i: length(examples[i]))


def accuracy(classifier: nn.Module, examples: Sequence[Any], labels: Sequence[int], batch_size: int = 64) -> float:
    """Fraction of `examples` classified correctly (0..1)."""
    predicted = predict(classifier, examples, batch_size)
    return float((predicted == torch.tensor(list(labels))).double().mean())


def load_adapter_state(classifier: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put an adapter state dict (PEFT keys, as saved) into the classifier's LoRA layers.

    Every LoRA key must match the model's: a merged, pruned or federated adapter is evaluated
    through exactly the modules PEFT would load it into.
    """
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(classifier.encoder, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        bad = (result.unexpected_keys or missing)[0]
        raise UserError(f"adapter does not fit the model: {'unexpected' if result.unexpected_keys else 'missing'} key {bad!r}")


def adapter_state(classifier: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the classifier's adapter state dict, keyed as PEFT saves it."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: "auto" would ask the hub about base_model_name_or_path (see adapters.save_peft_model)
    state = get_peft_model_state_dict(classifier.encoder, save_embedding_layers=False)
    return {k: v.detach().clone() for k, v in state.items()}


def state_accuracy(classifier: nn.Module, state: dict[str, torch.Tensor], data: FewShotData) -> float:
    """Accuracy of `classifier` with `state` loaded, on data's fixed evaluation subset."""
    load_adapter_state(classifier, state)
    return accuracy(classifier, data.eval_x, data.eval_y)
