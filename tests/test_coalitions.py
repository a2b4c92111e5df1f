"""Layer-by-layer runner and the prefix-sharing coalition evaluator against one forward per coalition."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from copra.analysis.coalitions import CoalitionEvaluator, ModelShapleyResult, shapley_for_model
from copra.core.gates import CopRA, lora_modules
from copra.models.evaluation import FewShotData, accuracy
from copra.models.layer_runner import LayerRunner
from copra.models.scoring import PromptScoring
from copra.models.text import PromptClassifier
from copra.training.loop import build_run
from copra.utils.errors import UserError

from conftest import tiny_bert, tiny_lora_bert, tiny_run_config

ALL_MASKS = np.array(list(itertools.product([False, True], repeat=3)))  # the 2^3 coalitions of 3 layers


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_runner_equals_full_forward_with_padding(attn):
    model = tiny_lora_bert(attention=attn)
    ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:], mask[2, 2:] = 0, 0
    runner = LayerRunner(model)
    assert runner.num_layers == 3
    with torch.no_grad():
        hidden, layer_mask = runner.start(ids, mask)
        split = runner.run(runner.run(hidden, layer_mask, 0, 1), layer_mask, 1)
        full = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(split, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(runner(ids, mask), full, atol=1e-6, rtol=0)


def test_runner_respects_gates():
    model = tiny_lora_bert()
    gates = CopRA(model, total_steps=1)
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    runner = LayerRunner(model)
    with torch.no_grad(), gates.active([True, False, True]):
        torch.testing.assert_close(runner(ids), model(input_ids=ids).last_hidden_state, atol=1e-6, rtol=0)


def test_runner_rejects_other_architectures():
    with pytest.raises(UserError, match="layer by layer"):
        LayerRunner(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def run(tiny_text_model):
    """A tiny 3-layer PromptClassifier with random LoRA B (adapters matter), its data, and gates."""
    classifier, data = build_run(tiny_run_config(tiny_text_model, eval_examples=20))
    assert len(classifier.tokenizer) > 50  # the saved vocabulary, not a handful of special tokens
    classifier.set_prompts(list(data.prompts))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in classifier.encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 2.0)
    # vary the lengths so that every chunk is padded
    eval_x = tuple(text if i % 3 else " ".join(text.split()[:2]) for i, text in enumerate(data.eval_x))
    data = FewShotData(data.task, data.class_names, data.prompts, data.train_x, data.train_y, eval_x, data.eval_y)
    return classifier, data, CopRA(classifier.encoder, total_steps=1)


@pytest.mark.parametrize("batch_size", [64, 6])
def test_fast_accuracy_equals_naive_loop(run, batch_size):
    classifier, data, gates = run
    evaluator = CoalitionEvaluator(classifier, gates, data, "accuracy", batch_size=batch_size)
    assert evaluator.fast
    fast, naive = evaluator.values(ALL_MASKS), evaluator.naive_values(ALL_MASKS)
    np.testing.assert_array_equal(fast, naive)
    assert len(set(fast.tolist())) > 1  # the adapters change the prediction
    assert evaluator.value([True, False, True]) == fast[5]


@pytest.mark.parametrize("batch_size", [64, 7])
def test_fast_neg_loss_equals_naive_loop(run, batch_size):
    classifier, data, gates = run
    evaluator = CoalitionEvaluator(classifier, gates, data, "neg_loss", batch_size=batch_size)
    np.testing.assert_allclose(evaluator.values(ALL_MASKS), evaluator.naive_values(ALL_MASKS), atol=1e-5, rtol=0)


def test_ends_and_duplicate_masks(run):
    classifier, data, gates = run
    for metric in ("accuracy", "neg_loss"):
        evaluator = CoalitionEvaluator(classifier, gates, data, metric, batch_size=8)
        v = evaluator.values(np.array([[False] * 3, [True] * 3, [False] * 3]))
        assert v[0] == v[2]
        everything_on = evaluator.naive_values(np.array([[True] * 3]))[0]  # gates on: only PEFT decides
        with classifier.encoder.disable_adapter():  # the empty coalition is the base model
            base = evaluator.naive_values(np.array([[True] * 3]))[0]
        assert v[0] == pytest.approx(base, abs=1e-6) and v[1] == pytest.approx(everything_on, abs=1e-6)
        if metric == "accuracy":  # plain LoRA, no mask set at all
            assert v[1] == accuracy(classifier, data.eval_x, data.eval_y)  # one scoring path: exactly
        else:
            assert v[0] != pytest.approx(v[1], abs=1e-4)  # the adapters matter


def test_state_restored(run):
    classifier, data, gates = run
    gates.set_active([False, True, False])
    classifier.train()
    try:
        CoalitionEvaluator(classifier, gates, data).values(ALL_MASKS[:3])
        assert gates.mask == [False, True, False] and gates._explicit
        assert classifier.training
        assert not any("forward" in vars(m.base_layer) for _, m in lora_modules(classifier.encoder))
    finally:
        gates.all_on()
        classifier.eval()
    assert gates.mask == [True] * 3


def test_shapley_for_model_exact_efficiency(run):
    classifier, data, gates = run
    result = shapley_for_model(classifier, gates, data, method="exact", metric="neg_loss")
    assert isinstance(result, ModelShapleyResult) and result.evaluations == 8
    assert result.players == gates.players == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    assert result.values.sum() == pytest.approx(result.v_full - result.v_empty, abs=1e-9)
    assert result.to_dict()["players"] == result.players
    sampled = shapley_for_model(classifier, gates, data, method="permutation", samples=3, seed=1)
    assert sampled.values.sum() == pytest.approx(sampled.v_full - sampled.v_empty, abs=1e-9)


class Delegating(PromptScoring, torch.nn.Module):
    """Not a PromptClassifier (no `prefix_sharing`): the evaluator must take the one-forward-per-coalition path."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.scale, self.prompts = inner, inner.scale, inner.prompts

    def embed(self, **inputs):
        return self.inner.embed(**inputs)

    def class_embeddings(self):
        return self.inner.class_embeddings()

    def inputs_for(self, examples, train=False):
        return self.inner.inputs_for(examples, train)


def test_fallback_for_other_classifiers(run):
    classifier, data, gates = run
    evaluator = CoalitionEvaluator(Delegating(classifier), gates, data, "neg_loss")
    assert not evaluator.fast
    reference = CoalitionEvaluator(classifier, gates, data, "neg_loss")
    np.testing.assert_allclose(evaluator.values(ALL_MASKS[:4]), reference.values(ALL_MASKS[:4]), atol=1e-5, rtol=0)


def test_module_players(run):
    classifier, data, gates = run
    per_module = CopRA(classifier.encoder, total_steps=1, granularity="module")
    try:
        evaluator = CoalitionEvaluator(classifier, per_module, data, "neg_loss", batch_size=16)
        assert evaluator.fast and len(evaluator.players) == 9
        masks = np.random.default_rng(0).random((6, 9)) < 0.5
        np.testing.assert_allclose(evaluator.values(masks), evaluator.naive_values(masks), atol=1e-5, rtol=0)
    finally:
        per_module.remove()


def test_bad_arguments(run):
    classifier, data, gates = run
    with pytest.raises(UserError, match="metric"):
        CoalitionEvaluator(classifier, gates, data, metric="f1")
    with pytest.raises(UserError, match="shape"):
        CoalitionEvaluator(classifier, gates, data).values(np.ones((2, 4), dtype=bool))
    with pytest.raises(UserError, match="method"):
        shapley_for_model(classifier, gates, data, method="banzhaf")


def test_blocks_without_adapters(run):
    from peft import LoraConfig, get_peft_model

    classifier, data, _ = run
    backbone = tiny_bert()
    backbone.resize_token_embeddings(classifier.tokenizer.vocab_size)
    torch.manual_seed(3)
    encoder = get_peft_model(
        backbone,
        LoraConfig(r=2, target_modules=["query", "value"], layers_to_transform=[0, 2], init_lora_weights=False),
    )
    sparse = PromptClassifier(encoder, classifier.tokenizer, max_length=16)
    sparse.set_prompts(list(data.prompts))
    gates = CopRA(encoder, total_steps=1)
    evaluator = CoalitionEvaluator(sparse, gates, data, "neg_loss", batch_size=8)
    assert evaluator.fast and evaluator.block_players == [[0], [], [1]]
    masks = np.array(list(itertools.product([False, True], repeat=2)))
    np.testing.assert_allclose(evaluator.values(masks), evaluator.naive_values(masks), atol=1e-5, rtol=0)
