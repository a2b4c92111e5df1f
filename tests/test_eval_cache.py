"""The evaluation cache: an accuracy measured once is read back for the same state, settings and data,
and measured again whenever any of them changes; a broken entry is measured again; the report skips it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from copra.core.config import TrainConfig
from copra.experiments.runner import eval_cache
from copra.experiments.runner.common import Evaluator
from copra.models.evaluation import adapter_state
from copra.report.assemble import find_summaries
from copra.utils import precision

from conftest import lora_adapter_config, run_with_random_b


@pytest.fixture(scope="module")
def run(tiny_text_model):
    config, classifier, data = run_with_random_b(tiny_text_model, eval_examples=20)
    return config, adapter_state(classifier), lora_adapter_config(config), data


def test_every_train_config_field_is_classified():
    """A new TrainConfig field must be declared as changing evaluations or not (else stale hits could follow)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    identity = set(eval_cache.EVAL_IDENTITY) | set(eval_cache.CAUSAL_EVAL_IDENTITY)
    other = set(eval_cache.NOT_EVAL_IDENTITY)
    assert not identity & other
    assert identity | other == names, f"classify these fields in eval_cache: {sorted(names - identity - other)}"


def test_a_second_evaluator_reads_back_what_the_first_measured(run, tmp_path):
    config, state, adapter_config, data = run
    with eval_cache.cached_evaluations(tmp_path / "cache"):
        first = Evaluator(config)
        value = first.accuracy(state, adapter_config, data)
        again = Evaluator(config)  # a step started again: a fresh process would build a fresh one
        assert again.accuracy(state, adapter_config, data) == value
    assert (first.measured, again.measured) == (1, 0)
    assert again.builds == 0  # not even a classifier was built
    entries = list((tmp_path / "cache").glob("*.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["accuracy"] == value
    assert eval_cache.is_cache(tmp_path / "cache")


def test_without_the_context_nothing_is_cached(run, tmp_path):
    config, state, adapter_config, data = run
    evaluator = Evaluator(config)
    evaluator.accuracy(state, adapter_config, data)
    evaluator.accuracy(state, adapter_config, data)
    assert evaluator.measured == 2


def test_any_change_of_what_decides_the_number_misses(run, tmp_path):
    config, state, adapter_config, data = run
    with eval_cache.cached_evaluations(tmp_path):
        Evaluator(config).accuracy(state, adapter_config, data)
        changed_state = {k: v.clone() for k, v in state.items()}
        name = next(k for k in changed_state if "lora_B" in k)
        changed_state[name].view(-1)[0] += 1e-3
        fewer = dataclasses.replace(data, eval_x=data.eval_x[:-1], eval_y=data.eval_y[:-1])
        other_prompts = dataclasses.replace(data, prompts=tuple(f"{p}!" for p in data.prompts))
        # the precision the run really uses ("auto" is fp32 on a CPU without native bf16)
        other_precision = {"fp32": "bf16", "bf16": "fp32"}[precision.resolve(config.precision, "cpu")]
        cases = [
            (config, changed_state, adapter_config, data),
            (config, state, {**adapter_config, "lora_alpha": 2.0}, data),
            (config, state, adapter_config, fewer),
            (config, state, adapter_config, other_prompts),
            (config.replace(precision=other_precision), state, adapter_config, data),
            (config.replace(logit_scale=config.logit_scale + 1), state, adapter_config, data),
        ]
        for base, s, a, d in cases:
            evaluator = Evaluator(base)
            evaluator.accuracy(s, a, d)
            assert evaluator.measured == 1
        # what only shapes training (seed, steps, lr) shares the entry
        same = Evaluator(config.replace(seed=config.seed + 5, steps=config.steps + 7, lr=0.5))
        same.accuracy(state, adapter_config, data)
        assert same.measured == 0


def test_a_broken_entry_is_measured_again(run, tmp_path):
    config, state, adapter_config, data = run
    with eval_cache.cached_evaluations(tmp_path):
        value = Evaluator(config).accuracy(state, adapter_config, data)
        (entry,) = tmp_path.glob("*.json")
        entry.write_text('{"accuracy": ')  # cut short (or edited by hand)
        evaluator = Evaluator(config)
        assert evaluator.accuracy(state, adapter_config, data) == value
        assert evaluator.measured == 1
        assert json.loads(entry.read_text())["accuracy"] == value  # and written back whole


def test_the_report_skips_the_cache(tmp_path):
    summary = tmp_path / "landscape" / "landscape.json"
    summary.parent.mkdir()
    summary.write_text(json.dumps({"experiment": "landscape", "config": {}}))
    eval_cache.record(tmp_path / "evaluations", "ab" * 32, 0.5, {})
    (tmp_path / "evaluations" / ("cd" * 32 + ".json")).write_text("{not json")  # would stop the report
    assert [e.path for e in find_summaries(tmp_path)] == [summary]


def test_state_digest_sees_dtype_shape_and_bytes():
    a = {"w": torch.zeros(2, 3)}
    digests = {
        eval_cache.state_digest(s)
        for s in (
            a,
            {"w": torch.zeros(3, 2)},
            {"w": torch.zeros(2, 3, dtype=torch.float64)},
            {"v": torch.zeros(2, 3)},
            {"w": torch.tensor([[0.0, 0, 0], [0, 0, -0.0]])},
        )
    }
    assert len(digests) == 5
    assert eval_cache.state_digest({"w": torch.zeros(2, 3)}) == eval_cache.state_digest(a)
    assert eval_cache.data_digest("t", [object()], [0], ["p"]) is None  # images: not cached
