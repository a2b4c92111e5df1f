"""Decoder LLMs as classifiers (copra.models.causal) on a tiny random Llama: answer log-likelihoods as the
one scoring path reads them, CopRA over the decoder blocks, adapters PEFT loads, and bad input as one line."""

import json
from pathlib import Path

import pytest
import torch
from causal_models import save_tiny_causal_model, tiny_causal_config

from copra.core.gates import CopRA
from copra.models.causal import answer_layout, split_prompts
from copra.training.loop import build_run
from copra.utils.errors import UserError


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    return str(save_tiny_causal_model(tmp_path_factory.mktemp("tiny_llama")))


def random_b(classifier) -> None:
    """LoRA B random (not zero), so the adapters change the scores."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in classifier.encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)


def reference_loglik(classifier, text: str) -> torch.Tensor:
    """Each class's answer log-likelihood from one plain forward of prompt + answer per class (no packing)."""
    prompt = classifier._head[0] + classifier.token_ids([text])[0] + classifier._tail
    row = []
    for answer in classifier._answers:
        with torch.no_grad():
            logprobs = classifier.lm(torch.tensor([prompt + answer])).logits[0].float().log_softmax(-1)
        row.append(sum(float(logprobs[len(prompt) - 1 + k, t]) for k, t in enumerate(answer)))
    return torch.tensor(row)


def test_split_prompts_keeps_words_whole():
    start, answers, names = split_prompts(["This is about sports.", "This is about space.", "This is about art."])
    assert start == "This is about" and answers == [" sports.", " space.", " art."]
    assert names == ["sports", "space", "art"]
    start, answers, names = split_prompts(["sports news.", "arts news."])
    assert start == "" and answers == ["sports news.", "arts news."] and names == ["sports", "arts"]


def test_answer_layout_feeds_all_but_each_answers_last_token():
    layout = answer_layout([[5, 6, 7], [8], [9, 10]])
    assert layout["fed"].tolist() == [5, 6, 9] and layout["owner"].tolist() == [0, 0, 2]
    assert layout["offset"].tolist() == [0, 1, 0]
    assert layout["targets"].tolist() == [5, 6, 7, 8, 9, 10] and layout["target_owner"].tolist() == [0, 0, 0, 1, 2, 2]
    assert layout["source"].tolist() == [-1, 0, 1, -1, -1, 2]  # -1: predicted at the prompt's last token


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_answers_score_as_one_forward_per_class(tmp_path, attention):
    """All classes in one packed forward (with left padding) = prompt + answer run separately per class."""
    config = tiny_causal_config(str(save_tiny_causal_model(tmp_path / "m")), precision="fp32")
    classifier, data = build_run(config)
    classifier.lm.config._attn_implementation = attention
    random_b(classifier)
    classifier.eval()
    texts = [data.eval_x[0], data.eval_x[1][:20], data.eval_x[2][:5]]  # three lengths: the batch is left-padded
    with torch.no_grad():
        packed = classifier.embed_batch(classifier.inputs_for(texts))
    assert packed.shape == (3, len(data.class_names))
    for row, text in enumerate(texts):
        torch.testing.assert_close(packed[row], reference_loglik(classifier, text), atol=1e-4, rtol=1e-5)


def test_mean_score_divides_by_answer_length(tiny_llama_folder):
    classifier, data = build_run(tiny_causal_config(tiny_llama_folder, answer_score="mean"))
    classifier.eval()
    inputs = classifier.inputs_for(list(data.eval_x[:2]))
    with torch.no_grad():
        loglik = classifier.embed_batch(inputs)
        lengths = torch.tensor([len(a) for a in classifier._answers], dtype=torch.float32)
        torch.testing.assert_close(classifier.scores(inputs, classifier.class_embeddings()), loglik / lengths)
        torch.testing.assert_close(classifier.logits(inputs), loglik / lengths)


def test_plain_lm_without_a_chat_template(tmp_path):
    config = tiny_causal_config(str(save_tiny_causal_model(tmp_path / "plain", chat=False)))
    classifier, data = build_run(config)
    classifier.eval()
    tail = classifier.tokenizer.decode(classifier._tail)
    assert tail == "\n" + split_prompts(list(data.prompts))[0]  # the answers' shared start, after a new line
    with torch.no_grad():
        torch.testing.assert_close(
            classifier.embed_batch(classifier.inputs_for([data.eval_x[0]]))[0],
            reference_loglik(classifier, data.eval_x[0]),
            atol=1e-4,
            rtol=1e-5,
        )


def test_chat_template_formats_the_prompt(tiny_llama_folder):
    classifier, data = build_run(tiny_causal_config(tiny_llama_folder, list_choices=True))
    ids = classifier.inputs_for([data.eval_x[0]])["input_ids"][0].tolist() + classifier._tail
    text = classifier.tokenizer.decode(ids)
    names = ", ".join(split_prompts(list(data.prompts))[2])
    assert text.startswith("<|im_start|>user\n")
    assert text.endswith(f"\n\nChoose one of: {names}.<|im_end|>\n<|im_start|>assistant\nThis news article is about")


def test_gates_are_the_decoder_blocks_and_all_off_is_the_base_model(tiny_llama_folder):
    classifier, data = build_run(tiny_causal_config(tiny_llama_folder))
    random_b(classifier)
    gates = CopRA(classifier.encoder, 10)
    assert gates.players == [f"model.layers.{i}" for i in range(3)]
    assert all(len(gates.modules_of(i)) == 3 for i in range(3))  # q, k, v of each LlamaDecoderLayer
    classifier.eval()
    inputs = classifier.inputs_for(list(data.eval_x[:3]))
    with torch.no_grad():
        adapted = classifier.scores(inputs)
        with gates.active([False, False, False]):
            off = classifier.scores(inputs)
        with classifier.encoder.disable_adapter():
            base = classifier.scores(inputs)
    torch.testing.assert_close(off, base)
    assert not torch.allclose(adapted, base)


def test_a_gated_off_block_gets_no_gradient_and_does_not_move(tiny_llama_folder):
    classifier, data = build_run(tiny_causal_config(tiny_llama_folder))
    random_b(classifier)
    gates = CopRA(classifier.encoder, 10)
    gates.set_active([True, False, True])
    classifier.train()
    params = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    off = {n: p.detach().clone() for n, p in classifier.named_parameters() if ".layers.1." in n and p.requires_grad}
    logits = classifier(**classifier.inputs_for(list(data.train_x[:4])))
    torch.nn.functional.cross_entropy(logits, torch.tensor(data.train_y[:4])).backward()
    named = dict(classifier.named_parameters())
    assert off and all(named[n].grad is None for n in off)
    assert all(named[n].grad is not None for n in named if ".layers.0." in n and named[n].requires_grad)
    optimizer.step()
    assert all(torch.equal(named[n], before) for n, before in off.items())


def test_trained_merged_and_pruned_adapters_load_in_peft(tiny_llama_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from copra.adapters.io import load_adapter
    from copra.adapters.ops import merge_folders, prune_folder
    from copra.models.evaluation import load_adapter_state
    from copra.training.loop import train

    config = tiny_causal_config(tiny_llama_folder, lr=0.05, steps=3)
    runs = [train(config.replace(method=m), output_dir=tmp_path / m) for m in ("copra", "lora")]
    folders = [Path(r.adapter_dir) for r in runs]
    adapter_config = json.loads((folders[0] / "adapter_config.json").read_text())
    assert (
        adapter_config["task_type"] == "CAUSAL_LM" and adapter_config["base_model_name_or_path"] == tiny_llama_folder
    )
    merged = merge_folders(folders, "fusion", output=tmp_path / "merged")
    ties = merge_folders(folders, "ties", density=0.5, output=tmp_path / "ties")
    pruned = prune_folder(folders[0], output=tmp_path / "pruned", scheme="high")
    for folder in (folders[0], merged, ties, pruned):
        state, settings = load_adapter(folder)  # PEFT's TIES writes its own alpha and scaling: built to match
        lora = dict(rank=settings["r"], lora_alpha=settings["lora_alpha"], use_rslora=settings["use_rslora"])
        classifier, data = build_run(config.replace(**lora))
        ids = classifier.inputs_for(list(data.eval_x[:2]))
        load_adapter_state(classifier, state)
        classifier.eval()
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_folder)
        peft = PeftModel.from_pretrained(base, str(folder)).eval()
        with torch.no_grad():
            torch.testing.assert_close(peft(**ids).logits, classifier.encoder(**ids).logits)
    kept = load_adapter(pruned)[0]  # "high" keeps the top third of the blocks: layer 2 of 0-2
    assert all(not torch.count_nonzero(v) for k, v in kept.items() if ".layers.2." not in k)
    assert all(torch.count_nonzero(v) for k, v in kept.items() if ".layers.2." in k)


def test_a_prompt_longer_than_the_context_is_one_line(tmp_path):
    folder = str(save_tiny_causal_model(tmp_path / "short", positions=48))
    with pytest.raises(UserError, match=r"exceeds the model's context of 48 positions; lower max_length"):
        build_run(tiny_causal_config(folder, max_length=40))


def test_bad_models_are_one_line(tiny_text_model, tiny_llama_folder, tmp_path):
    from copra.models import build_classifier

    with pytest.raises(UserError, match="unknown embedded model 'embedded:nope'"):
        build_classifier(tiny_causal_config(tiny_llama_folder, model="embedded:nope"))
    with pytest.raises(UserError, match="embedded:smollm2 is a causal model: set backbone=causal"):
        build_classifier(tiny_causal_config(tiny_llama_folder, backbone="text", model="embedded:smollm2"))
    with pytest.raises(UserError, match="cannot load the causal LM"):
        build_classifier(tiny_causal_config(str(tmp_path / "nothing")))
    with pytest.raises(UserError, match="target module 'q_proj' is not in the model BertLMHeadModel"):
        build_classifier(tiny_causal_config(tiny_text_model))  # BERT loads as a causal LM, with other names
    with pytest.raises(UserError, match="answer_score must be one of"):
        tiny_causal_config(tiny_llama_folder, answer_score="max")


def test_zero_shot_table_builds_an_embedded_causal_model(tiny_llama_folder, monkeypatch):
    """`copra tasks --zero-shot --model embedded:...` takes the model's backbone and LoRA targets from EMBEDDED."""
    from copra.experiments.task_table import task_rows
    from copra.models import base_model

    spec = base_model.EmbeddedModel("org/tiny", (), "0", ("q_proj", "k_proj", "v_proj"), backbone="causal")
    monkeypatch.setitem(base_model.EMBEDDED, tiny_llama_folder, spec)  # its folder stands in for a wheel's name
    assert base_model.model_settings(tiny_llama_folder)["backbone"] == "causal"
    rows = task_rows(
        ["bbc_news", "parl_party"], zero_shot=True, eval_examples=6, model=tiny_llama_folder, progress=False
    )
    assert [r["evaluated"] for r in rows] == [6, 6] and all(0 <= r["zero_shot"] <= 1 for r in rows)


def test_eval_cache_keys_how_answers_are_scored_for_causal_models_only():
    from copra.core.config import make_config
    from copra.experiments.runner.eval_cache import key

    def of(config):
        return key("state", {"r": 2}, config, "fp32", "cpu", "data")

    causal, text = make_config(dict(preset="smollm2")), make_config({})
    assert of(causal) != of(causal.replace(answer_score="mean")) != of(causal.replace(list_choices=True))
    assert of(text) == of(text.replace(answer_score="mean", list_choices=True))  # older text keys stay valid


def test_cli_trains_a_causal_adapter_and_prunes_it_by_shapley_values(tiny_llama_folder, tmp_path, capsys):
    """`copra train --set preset=smollm2 ...` and `copra prune --keep-by-shapley auto` (coalitions, one forward each)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from copra.adapters.io import load_adapter
    from copra.cli import main

    sets = dict(preset="smollm2", model=tiny_llama_folder, task="bbc_news", shots=2, steps=3, batch_size=4)
    sets |= dict(eval_examples=8, max_length=16, precision="fp32", progress="false", output_dir=str(tmp_path / "run"))
    assert main(["train", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]) == 0
    assert "copra on bbc_news, seed 0: accuracy" in capsys.readouterr().out
    adapter = tmp_path / "run" / "adapter"
    args = ["prune", str(adapter), "--keep-by-shapley", "auto", "--keep", "1", "--task", "bbc_news", "--samples", "8"]
    assert main([*args, "-o", str(tmp_path / "kept")]) == 0
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_folder), str(tmp_path / "kept"))
    state, _ = load_adapter(tmp_path / "kept")
    kept = {i for i in range(3) if any(torch.count_nonzero(v) for k, v in state.items() if f".layers.{i}." in k)}
    assert len(kept) == 1  # one decoder block of three kept
