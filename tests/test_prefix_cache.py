"""The frozen-prefix cache is an exact speed-up: same losses, same adapter, fewer blocks computed."""

import pytest
import torch

from copra.training.loop import train

from conftest import tiny_run_config


def test_prefix_cache_changes_nothing_but_work(tiny_text_model):
    config = tiny_run_config(tiny_text_model, method="copra", steps=10, lora_dropout=0.25)
    cached = train(config)
    plain = train(config.replace(prefix_cache=False))
    assert cached.masks == plain.masks
    assert cached.final_loss == pytest.approx(plain.final_loss, abs=1e-5)
    for key in plain.state:
        torch.testing.assert_close(cached.state[key], plain.state[key], atol=1e-5, rtol=1e-4)
    assert cached.accuracy == plain.accuracy


def test_frozen_blocks_follow_the_gates(tiny_text_model):
    from copra.core.gates import CopRA
    from copra.training.loop import build_run

    classifier, data = build_run(tiny_run_config(tiny_text_model))
    gates = CopRA(classifier.encoder, total_steps=10)
    assert classifier.enable_prefix_cache(gates)
    cache = classifier.prefix_cache
    gates.set_active([False, False, True])
    assert cache.frozen_blocks() == 2
    gates.set_active([False, True, True])
    assert cache.frozen_blocks() == 1
    gates.all_on()
    assert cache.frozen_blocks() == 0
    # the cached path equals the full forward for the same gates, with padding in the batch
    gates.set_active([False, False, True])
    classifier.train()
    inputs = classifier.inputs_for(["the market", "a film about music and the news of the year"])
    via_cache = classifier.embed(**inputs)
    assert cache.hits == 2 * 2
    again = classifier.embed(**inputs)  # second time: served from the cache
    classifier.prefix_cache = None
    full = classifier.embed(**inputs)
    torch.testing.assert_close(via_cache, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(again, full, atol=1e-6, rtol=1e-5)


def test_prefix_cache_refused_with_backbone_dropout(tiny_text_model):
    from copra.core.gates import CopRA
    from copra.training.loop import build_run

    classifier, _ = build_run(tiny_run_config(tiny_text_model, backbone_dropout=0.1))
    assert not classifier.enable_prefix_cache(CopRA(classifier.encoder, total_steps=10))


def test_cached_states_do_not_depend_on_the_batch_a_row_came_in(tiny_text_model):
    """A resumed run fills the cache in other batches than the uninterrupted one: same bits needed.

    CPU matmuls can differ in the last bits with the padded length, so each row is computed alone.
    """
    from copra.core.gates import CopRA
    from copra.training.loop import build_run

    classifier, _ = build_run(tiny_run_config(tiny_text_model, max_length=32))
    classifier.train()
    text = "the market said good news"
    batches = [
        [text],
        [text, "a film"],
        [text, "the news of the year about music and the film market said"],
        [text, "zyxwvut qponmlk jihgfed cba"],
    ]  # spelled letter by letter: cut at 32 tokens
    cached = []
    for batch in batches:
        gates = CopRA(classifier.encoder, total_steps=10)
        classifier.enable_prefix_cache(gates)
        gates.set_active([False, False, True])
        classifier.embed(**classifier.inputs_for(batch))
        cached.append(next(iter(classifier.prefix_cache._rows.values())))  # the first row: `text`
        gates.remove()
    for states in cached[1:]:
        assert len(states) == len(cached[0]) == 3
        assert all(torch.equal(a, b) for a, b in zip(states, cached[0]))
