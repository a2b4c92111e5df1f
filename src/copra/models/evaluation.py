"""The one scoring path: predictions and accuracy of a prompt classifier, and adapter state I/O.

Every caller scores through here: training's final and early accuracy, the experiments'
`common.Evaluator`, the coalition evaluator (`copra.analysis.coalitions`) and Flower's server. The classifier
gives the class scores of a batch (`scores`, `copra.models.scoring`); `predict` takes their argmax
over batches formed in input-length order; `fraction_correct` turns predictions into a number.
Accuracy is the exact count / N in float64: the copies this replaced averaged in float64 (here) and
float32 (the experiments); float64 is the exact one and kept every number the demo prints.

Few-shot data preparation lives in `copra.data.fewshot` (re-exported here: `FewShotData`,
`prepare_data`, `prepare_validation`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from copra.data.fewshot import FewShotData, prepare_data, prepare_validation
from copra.utils.errors import UserError

Batch = tuple[list[int], dict[str, torch.Tensor]]  # (rows of the evaluation set, collated inputs)


@contextmanager
def evaluating(classifier: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside (dropout off; every adapter on unless a gate mask is set), the old mode after."""
    was_training = classifier.training
    classifier.eval()
    try:
        yield classifier
    finally:
        classifier.train(was_training)


def length_order(classifier: nn.Module, examples: Sequence[Any]) -> list[int]:
    """Indices of `examples` from shortest to longest input (stable); as given if lengths are unknown (images)."""
    length = getattr(classifier, "input_length", None)
    if length is None:
        return list(range(len(examples)))
    return sorted(range(len(examples)), key=lambda i: length(examples[i]))


def eval_batches(classifier: nn.Module, examples: Sequence[Any], batch_size: int = 64) -> Iterator[Batch]:
    """(rows, inputs) of `batch_size` examples in `length_order`, collated one batch at a time.

    Each batch is padded only to a similar length; a caller that scores one set many times may keep
    the list (`experiments.common.Evaluator`).
    """
    order = length_order(classifier, examples)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield rows, classifier.inputs_for([examples[i] for i in rows])


def predict(
    classifier: nn.Module, examples: Sequence[Any], batch_size: int = 64, batches: Iterable[Batch] | None = None
) -> torch.Tensor:
    """Predicted class ids for `examples`: argmax of `classifier.scores`, in eval mode.

    Runs under `torch.inference_mode` in the classifier's precision; the class prompts are embedded
    once for all batches. `batches` (default `eval_batches`) must cover every row once.
    """
    with evaluating(classifier), torch.inference_mode():
        classes = classifier.class_embeddings()  # [C, H], once for all batches
        predicted = torch.empty(len(examples), dtype=torch.long)
        for rows, inputs in eval_batches(classifier, examples, batch_size) if batches is None else batches:
            predicted[rows] = classifier.scores(inputs, classes).argmax(-1).cpu()
        return predicted


class Scored(NamedTuple):
    """Per-example outcome of one evaluation: what paired bootstraps and cross-entropy need."""

    correct: torch.Tensor  # [N] bool: the argmax of the scores is the label (as `predict`)
    nll: torch.Tensor  # [N] float64: cross-entropy of the label under the training logits (scale * cosine)

    @property
    def accuracy(self) -> float:
        return float(self.correct.double().mean())

    @property
    def cross_entropy(self) -> float:
        return float(self.nll.mean())


def score_examples(
    classifier: nn.Module,
    examples: Sequence[Any],
    labels: Sequence[int],
    batch_size: int = 64,
    batches: Iterable[Batch] | None = None,
) -> Scored:
    """Per-example correctness and cross-entropy of `examples`, in eval mode (one forward per batch).

    Correctness is `predict`'s (argmax of the cosines); the cross-entropy reads the logits training
    optimises, so a merge that keeps the argmax but blurs the margins shows here first.
    """
    target = torch.tensor(list(labels))
    with evaluating(classifier), torch.inference_mode():
        classes = classifier.class_embeddings()  # [C, H], once for all batches
        correct = torch.empty(len(examples), dtype=torch.bool)
        nll = torch.empty(len(examples), dtype=torch.float64)
        for rows, inputs in eval_batches(classifier, examples, batch_size) if batches is None else batches:
            embedded = classifier.embed_batch(inputs)  # [B, H]
            correct[rows] = classifier.scores_of(embedded, classes).argmax(-1).cpu() == target[rows]
            logits = classifier.logits_of(embedded, classes).float().cpu()  # [B, C]
            nll[rows] = torch.nn.functional.cross_entropy(logits, target[rows], reduction="none").double()
        return Scored(correct, nll)


def fraction_correct(predicted: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Share of predictions equal to their label (0..1): the exact count / N, in float64."""
    labels = labels if isinstance(labels, torch.Tensor) else torch.tensor(list(labels))
    return float((predicted == labels).double().mean())


def accuracy(
    classifier: nn.Module,
    examples: Sequence[Any],
    labels: Sequence[int],
    batch_size: int = 64,
    batches: Iterable[Batch] | None = None,
) -> float:
    """Fraction of `examples` classified correctly (0..1); NaN for an empty set."""
    return fraction_correct(predict(classifier, examples, batch_size, batches), labels)


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
        raise UserError(
            f"adapter does not fit the model: {'unexpected' if result.unexpected_keys else 'missing'} key {bad!r}"
        )


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


__all__ = [
    "Batch",
    "FewShotData",
    "Scored",
    "accuracy",
    "adapter_state",
    "eval_batches",
    "evaluating",
    "fraction_correct",
    "length_order",
    "load_adapter_state",
    "predict",
    "prepare_data",
    "prepare_validation",
    "score_examples",
    "state_accuracy",
]
