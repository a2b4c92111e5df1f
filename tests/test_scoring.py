"""One scoring path: evaluation, the experiments' Evaluator, the coalition evaluator and Flower agree exactly.

Each caller is checked two ways: its number equals `copra.models.evaluation.accuracy` bit for bit, and a
classifier whose `scores_of` / `logits_of` is replaced changes every caller's number as predicted
(so none of them computes scores on its own).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from copra.analysis.coalitions import CoalitionEvaluator
from copra.core.gates import CopRA
from copra.data import fewshot
from copra.experiments.runner.common import Evaluator
from copra.models import evaluation
from copra.models.evaluation import FewShotData, accuracy, adapter_state, fraction_correct, predict, state_accuracy
from copra.models.scoring import PromptScoring
from copra.training.loop import build_run

from conftest import lora_adapter_config, run_with_random_b, tiny_run_config

ALL_MASKS = np.array(list(itertools.product([False, True], repeat=3)))


@pytest.fixture(scope="module")
def run(tiny_text_model):
    """A tiny classifier with random LoRA B, 30 evaluation examples (k/30 is not a float32 number)."""
    return run_with_random_b(tiny_text_model, eval_examples=30)


adapter_config = lora_adapter_config


def test_accuracy_is_the_exact_count_over_n_in_float64(run):
    _, classifier, data = run
    predicted = predict(classifier, data.eval_x)
    hits = sum(int(p) == y for p, y in zip(predicted.tolist(), data.eval_y))
    assert 0 < hits < len(data.eval_y)
    assert accuracy(classifier, data.eval_x, data.eval_y) == hits / len(data.eval_y)
    assert fraction_correct(predicted, data.eval_y) == hits / len(data.eval_y)
    assert math.isnan(fraction_correct(torch.empty(0, dtype=torch.long), []))


def test_scores_are_the_cosines_whose_argmax_predict_takes(run):
    _, classifier, data = run
    classifier.eval()
    inputs = classifier.inputs_for(list(data.eval_x[:8]))
    with torch.no_grad():
        scores = classifier.scores(inputs)
        embedded = classifier.embed(**inputs)
        assert torch.equal(scores, embedded @ classifier.class_embeddings().T)
        assert scores.abs().max() <= 1 + 1e-5  # cosines
        logits = classifier(**inputs)  # what training's cross-entropy reads
        assert torch.equal(logits, classifier.scale * embedded @ classifier.class_embeddings().T)
        assert torch.equal(classifier.logits(inputs), logits)
    order = evaluation.length_order(classifier, data.eval_x[:8])
    assert torch.equal(predict(classifier, data.eval_x[:8])[order], scores.argmax(-1)[order])


def test_experiments_evaluator_equals_evaluation_accuracy(run):
    config, classifier, data = run
    state = adapter_state(classifier)
    value = Evaluator(config).accuracy(state, adapter_config(config), data)
    fresh, _ = build_run(config, data)
    assert value == state_accuracy(fresh, state, data)  # exactly: one arithmetic, float64
    assert value * len(data.eval_y) == round(value * len(data.eval_y))


def test_coalition_all_on_is_accuracy_of_the_full_model(run):
    _, classifier, data = run
    gates = CopRA(classifier.encoder, total_steps=1)
    try:
        evaluator = CoalitionEvaluator(classifier, gates, data, "accuracy", batch_size=8)
        assert evaluator.fast
        full = accuracy(classifier, data.eval_x, data.eval_y)
        assert evaluator.value([True] * 3) == full
        assert evaluator.naive_values(ALL_MASKS[-1:])[0] == full
        with classifier.encoder.disable_adapter():
            assert evaluator.value([False] * 3) == accuracy(classifier, data.eval_x, data.eval_y)
    finally:
        gates.remove()


class Always(PromptScoring):
    """Scores that always pick class 0 and zero logits: any caller that scores through the classifier sees them."""

    def scores_of(self, embedded, classes=None):
        out = torch.zeros(len(embedded), len(self.prompts))
        out[:, 0] = 1.0
        return out

    def logits_of(self, embedded, classes=None):
        return torch.zeros(len(embedded), len(self.prompts))


def test_every_caller_scores_through_the_classifier(run, monkeypatch):
    config, classifier, data = run
    monkeypatch.setattr(PromptScoring, "scores_of", Always.scores_of)
    monkeypatch.setattr(PromptScoring, "logits_of", Always.logits_of)
    share_of_class_0 = sum(y == 0 for y in data.eval_y) / len(data.eval_y)
    assert accuracy(classifier, data.eval_x, data.eval_y) == share_of_class_0
    assert state_accuracy(classifier, adapter_state(classifier), data) == share_of_class_0
    assert Evaluator(config).accuracy(adapter_state(classifier), adapter_config(config), data) == share_of_class_0
    gates = CopRA(classifier.encoder, total_steps=1)
    try:
        for metric, want in (("accuracy", share_of_class_0), ("neg_loss", -math.log(len(data.prompts)))):
            evaluator = CoalitionEvaluator(classifier, gates, data, metric, batch_size=8)
            for values in (evaluator.values(ALL_MASKS), evaluator.naive_values(ALL_MASKS[:2])):
                np.testing.assert_allclose(values, want, rtol=0, atol=1e-6)
    finally:
        gates.remove()


def test_flower_server_scores_merged_adapters_with_state_accuracy(run):
    pytest.importorskip("flwr")
    from copra.federated.replies import to_record
    from copra.federated.simulation import merged_accuracy

    _, classifier, data = run
    state = adapter_state(classifier)
    want = state_accuracy(classifier, state, data)
    evaluate = merged_accuracy(classifier, data)
    assert evaluate(0, to_record(state)) is None  # round 0: nothing merged yet
    assert evaluate(1, to_record(state))["accuracy"] == want


def test_few_shot_preparation_lives_in_data_and_is_re_exported(tiny_text_model):
    for name in ("FewShotData", "prepare_data", "prepare_validation"):
        assert getattr(evaluation, name) is getattr(fewshot, name)
    data = evaluation.prepare_data(tiny_run_config(tiny_text_model, eval_examples=12))
    assert isinstance(data, FewShotData) and len(data.eval_x) == len(data.eval_y) == 12


def test_validation_split_of_a_user_file_task():
    """prepare_validation loads the task as prepare_data does (it once asked the built-in registry for file:...)."""
    pytest.importorskip("datasets")
    from pathlib import Path

    from copra.core.config import make_config

    example = Path(__file__).resolve().parents[1] / "examples" / "reviews.csv"
    config = make_config(dict(task=f"file:{example}", text_column="review", label_column="topic", shots=2))
    data = evaluation.prepare_validation(config, 6)
    assert len(data.eval_x) == 6 and sorted(set(data.eval_y)) == [0, 1, 2]
    assert not set(data.eval_x) & set(data.train_x)
    assert data.train_x == evaluation.prepare_data(config).train_x
