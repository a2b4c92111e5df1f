"""Mixed precision (bf16 autocast, fp32 master weights), LoRA dropout from bulk bits, dynamic padding."""

import json

import pytest
import torch
from safetensors.torch import load_file

from copra.core.config import make_config
from copra.core.gates import CopRA
from copra.models.evaluation import predict
from copra.models.lora import BitsDropout, swap_lora_dropout
from copra.training.loop import build_run, train
from copra.utils import precision
from copra.utils.errors import UserError

from conftest import interrupted_run, tiny_run_config


@pytest.fixture
def native_bf16(monkeypatch):
    """Every CPU runs bf16 autocast (emulated where it lacks the instructions); this fakes the probe
    so the bf16 paths of "auto" run on any machine, as the fp32 fallback tests fake its absence."""
    monkeypatch.setattr(precision, "bf16_supported", lambda device_type="cpu": True)


def test_auto_picks_bf16_where_supported_and_fp32_elsewhere(monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda device_type="cpu": True)
    assert precision.resolve("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "bf16_supported", lambda device_type="cpu": False)
    assert precision.resolve("auto", "cpu") == "fp32"
    assert precision.resolve("bf16", "cpu") == "bf16"  # asked for explicitly: used even where emulated
    assert precision.resolve("fp32", "cuda") == "fp32"


def test_fp16_on_the_cpu_and_unknown_precisions_are_one_line_errors(tiny_text_model, tmp_path):
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        precision.resolve("fp16", "cpu")
    with pytest.raises(UserError, match="precision must be one of"):
        make_config(dict(precision="int8"))
    if not torch.cuda.is_available():
        out = tmp_path / "run"
        with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
            train(tiny_run_config(tiny_text_model, precision="fp16"), output_dir=out)
        assert not out.exists()  # refused before anything was written


def test_fallback_run_is_fp32_throughout(tiny_text_model, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "bf16_supported", lambda device_type="cpu": False)
    classifier, _ = build_run(tiny_run_config(tiny_text_model))
    assert classifier.precision == "fp32"
    assert {p.dtype for p in classifier.parameters()} == {torch.float32}


def test_bf16_run_keeps_adapters_optimizer_and_files_fp32(tiny_text_model, tmp_path):
    out = tmp_path / "run"
    config = tiny_run_config(tiny_text_model, precision="bf16", method="copra", steps=3)
    classifier, _ = build_run(config)
    frozen = {
        p.dtype
        for n, p in classifier.named_parameters()
        if not p.requires_grad and p.dim() == 2 and "embeddings" not in n
    }
    assert frozen == {torch.bfloat16}  # the backbone's Linear weights, cast once
    assert {p.dtype for p in classifier.parameters() if p.requires_grad} == {torch.float32}
    result = train(config, output_dir=out)
    assert result.precision == "bf16"
    assert json.loads((out / "result.json").read_text())["precision"] == "bf16"
    assert {t.dtype for t in load_file(str(out / "adapter" / "adapter_model.safetensors")).values()} == {torch.float32}
    assert 0.0 <= result.accuracy <= 1.0 and all(torch.isfinite(torch.tensor(result.losses)))


def test_bf16_resume_is_bit_identical_to_an_uninterrupted_bf16_run(tiny_text_model, tmp_path, monkeypatch):
    config = tiny_run_config(
        tiny_text_model,
        task="parl_party",
        method="copra",
        precision="bf16",
        steps=6,
        checkpoint_every=1,
        lora_dropout=0.25,
    )
    reference = tmp_path / "reference"
    train(config, output_dir=reference)
    out = tmp_path / "killed"
    interrupted_run(config, out, 3, monkeypatch)
    resumed = train(config, output_dir=out, resume=True)
    assert resumed.resumed_from == 3 and resumed.precision == "bf16"
    a = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = json.loads((reference / "result.json").read_text())
    assert first["losses"] == json.loads((out / "result.json").read_text())["losses"]


def test_a_resume_in_another_precision_is_refused(tiny_text_model, tmp_path, monkeypatch, native_bf16):
    config = tiny_run_config(tiny_text_model, precision="auto", steps=4, checkpoint_every=1)
    out = tmp_path / "run"
    interrupted_run(config, out, 2, monkeypatch)
    monkeypatch.setattr(precision, "bf16_supported", lambda device_type="cpu": False)  # "another machine"
    with pytest.raises(UserError, match="was trained in bf16"):
        train(config, output_dir=out, resume=True)


def test_gated_off_adapters_get_no_gradient_under_autocast(tiny_text_model):
    classifier, data = build_run(tiny_run_config(tiny_text_model, precision="bf16", method="copra"))
    gates = CopRA(classifier.encoder, total_steps=10)
    gates.set_active([False, True, False])
    classifier.train()
    inputs = classifier.inputs_for(list(data.train_x[:4]), train=True)
    torch.nn.functional.cross_entropy(classifier(**inputs), torch.tensor(data.train_y[:4])).backward()
    for index, player in enumerate(gates.players):
        grads = [p.grad for m in gates.modules_of(index) for n, p in m.named_parameters() if "lora_" in n]
        if index == 1:
            assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
            assert any(bool(g.abs().sum() > 0) for g in grads)
        else:
            assert all(g is None for g in grads), player


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_dynamic_padding_gives_the_predictions_of_fixed_padding(tiny_text_model, kind):
    classifier, data = build_run(tiny_run_config(tiny_text_model, precision=kind, eval_examples=40, max_length=32))
    classifier.eval()
    texts = [" ".join(t.split()[: 1 + i % 3]) for i, t in enumerate(data.eval_x)]  # 1-3 words: lengths vary
    fixed = classifier.tokenizer(
        texts, padding="max_length", truncation=True, max_length=classifier.max_length, return_tensors="pt"
    )
    dynamic = classifier.tokenize(texts)
    width = dynamic["input_ids"].shape[1]
    assert width < fixed["input_ids"].shape[1]  # some padding is saved on this task
    assert torch.equal(dynamic["input_ids"], fixed["input_ids"][:, :width])  # the same tokens, less padding
    with torch.inference_mode():
        a = classifier.embed(fixed["input_ids"], fixed["attention_mask"])
        b = classifier.embed(**dynamic)
        classes = classifier.class_embeddings()
    torch.testing.assert_close(a, b, atol=1e-5 if kind == "fp32" else 3e-2, rtol=0)
    scores_a, scores_b = a @ classes.T, b @ classes.T
    # a row's prediction may only flip where its top-two margin is within the rounding of its embedding
    # (|score difference| <= ||a_r - b_r||, the class embeddings having unit norm)
    top = scores_a.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 2 * (a - b).norm(dim=-1)
    assert torch.equal(scores_a.argmax(-1)[clear], scores_b.argmax(-1)[clear])
    if kind == "fp32":
        assert bool(clear.all()) and torch.equal(scores_a.argmax(-1), predict(classifier, texts))


def test_each_text_is_tokenised_once_per_classifier(tiny_text_model):
    classifier, data = build_run(tiny_run_config(tiny_text_model, precision="fp32"))
    calls = []
    tokenizer = classifier.tokenizer
    classifier.tokenizer = lambda texts, **kw: calls.append(list(texts)) or tokenizer(texts, **kw)
    classifier.tokenizer.pad_token_id, classifier.tokenizer.padding_side = (
        tokenizer.pad_token_id,
        tokenizer.padding_side,
    )
    texts = list(data.train_x)
    first = classifier.tokenize(texts)
    second = classifier.tokenize(texts[::-1])
    assert sum(len(c) for c in calls) == len(set(texts))
    assert torch.equal(first["input_ids"], second["input_ids"].flip(0))
    classifier.max_length = 5  # a changed setting is not served from the cache
    assert classifier.tokenize(texts)["input_ids"].shape[1] == 5


def test_sorted_evaluation_returns_predictions_in_input_order(tiny_text_model):
    classifier, data = build_run(tiny_run_config(tiny_text_model, precision="fp32", eval_examples=30))
    texts = list(data.eval_x)
    together = predict(classifier, texts, batch_size=7)
    one_by_one = torch.cat([predict(classifier, [t], batch_size=1) for t in texts])
    assert torch.equal(together, one_by_one)


@pytest.mark.parametrize("p", [0.25, 0.1, 0.5, 1 / 3])
def test_bits_dropout_keeps_bernoulli_one_minus_p_with_inverted_scaling(p):
    torch.manual_seed(0)
    dropout = BitsDropout(p).train()
    x = torch.ones(200, 1000)
    y = dropout(x)
    kept = y != 0
    n = x.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)
    torch.testing.assert_close(y[kept], torch.full((int(kept.sum()),), 1 / (1 - p)))
    rows = kept.float().mean(1)  # no structure: rows (and lanes within a word) are alike
    assert rows.std().item() < 5 * ((p * (1 - p) / 1000) ** 0.5)
    lanes = kept.view(-1, 64 // dropout.bits).float().mean(0)  # each byte/short/int of a random word
    assert (lanes - (1 - p)).abs().max().item() < 5 * ((p * (1 - p) / (n / len(lanes))) ** 0.5)
    assert torch.equal(dropout.eval()(x), x)


def test_bits_dropout_edges_and_gradient():
    assert torch.equal(BitsDropout(0.0).train()(torch.ones(3, 5)), torch.ones(3, 5))
    assert torch.equal(BitsDropout(1.0).train()(torch.ones(3, 5)), torch.zeros(3, 5))
    with pytest.raises(ValueError):
        BitsDropout(1.5)
    x = torch.randn(64, 33, requires_grad=True)
    y = BitsDropout(0.25).train()(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.75)  # the same mask scales the gradient


def test_peft_lora_dropout_is_swapped_for_bits_dropout(tiny_text_model):
    classifier, _ = build_run(tiny_run_config(tiny_text_model, lora_dropout=0.25, precision="fp32"))
    dropouts = [m for n, m in classifier.encoder.named_modules() if n.split(".")[-2:-1] == ["lora_dropout"]]
    assert dropouts and all(isinstance(d, BitsDropout) and d.p == 0.25 for d in dropouts)
    assert not [m for m in classifier.encoder.modules() if type(m) is torch.nn.Dropout and m.p > 0]
    assert swap_lora_dropout(classifier.encoder) == 0  # nothing left to swap


def test_demo_and_experiment_summaries_carry_the_precision(monkeypatch):
    from copra.experiments.demo import DemoConfig
    from copra.experiments.runner.common import run_precision

    assert DemoConfig(precision="fp32").run_config("bbc_news", "lora", 0).precision == "fp32"
    with pytest.raises(UserError, match="precision must be one of"):
        DemoConfig(precision="half")
    monkeypatch.setattr(precision, "bf16_supported", lambda device_type="cpu": True)
    assert run_precision({}) == "bf16" and run_precision({"overrides": {"precision": "fp32"}}) == "fp32"
    monkeypatch.setattr(precision, "bf16_supported", lambda device_type="cpu": False)
    assert run_precision({"overrides": {}}) == "fp32"
