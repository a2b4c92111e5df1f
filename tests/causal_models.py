"""Tiny random-init decoder LLMs for the causal-classifier tests: a LlamaForCausalLM and a byte-level BPE
tokenizer (with or without a ChatML chat template) saved like a hub checkpoint, and a tiny GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("Ġ", "a"), ("o", "n"), ("e", "r")]


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 symbols a byte-level BPE starts from."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokens() -> list[str]:
    return SPECIALS + byte_alphabet() + ["".join(m) for m in MERGES]


def save_tiny_tokenizer(folder: Path, chat: bool = True):
    """A byte-level BPE tokenizer (pad = eos = <|im_end|>), with a ChatML template when `chat`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(tiny_tokens())}
    backend = Tokenizer(models.BPE(vocab, list(MERGES)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    if chat:
        tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def tiny_llama(layers: int = 3, seed: int = 0, positions: int = 256, attention: str | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tiny_tokens()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        tie_word_embeddings=True,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
        **({"attn_implementation": attention} if attention else {}),
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_causal_model(folder: Path, layers: int = 3, chat: bool = True, positions: int = 256) -> Path:
    """A tiny random Llama + tokenizer saved like a hub checkpoint (offline stand-in for SmolLM2)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_tiny_tokenizer(folder, chat)
    tiny_llama(layers, positions=positions).save_pretrained(str(folder))
    return folder


def write_tiny_gguf(path: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny llama-architecture GGUF (Q4_1 weights, gpt2 tokenizer, chat template), written by gguf's writer."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens, heads, kv, ffn = tiny_tokens(), 2, 1, 64
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges([" ".join(m) for m in MERGES])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHATML)
    q4_1 = gguf.GGMLQuantizationType.Q4_1

    def quantized(name: str, shape: tuple[int, int]) -> None:
        weights = rng.normal(0, 0.2, size=shape).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(weights, q4_1), raw_dtype=q4_1)

    def plain(name: str, size: int) -> None:
        writer.add_tensor(name, (1 + rng.normal(0, 0.1, size=(size,))).astype(np.float32))

    head_dim = hidden // heads
    quantized("token_embd.weight", (len(tokens), hidden))
    for i in range(layers):
        plain(f"blk.{i}.attn_norm.weight", hidden)
        plain(f"blk.{i}.ffn_norm.weight", hidden)
        quantized(f"blk.{i}.attn_q.weight", (hidden, hidden))
        quantized(f"blk.{i}.attn_k.weight", (kv * head_dim, hidden))
        quantized(f"blk.{i}.attn_v.weight", (kv * head_dim, hidden))
        quantized(f"blk.{i}.attn_output.weight", (hidden, hidden))
        quantized(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        quantized(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        quantized(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    plain("output_norm.weight", hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_causal_config(model_path: str, **overrides):
    """A TrainConfig that trains the tiny Llama on a real task in seconds."""
    from copra.core.config import make_config

    values = dict(
        preset="smollm2",
        model=model_path,
        task="bbc_news",
        shots=2,
        steps=4,
        batch_size=4,
        eval_examples=10,
        max_length=16,
        precision="fp32",
        progress=False,
    )
    return make_config(values | overrides)
