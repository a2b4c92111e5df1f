"""Tiny random-init models shared by the unit tests (peft's tests/test_custom_models.py spirit)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_bert(layers: int = 3, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def tiny_lora_bert(layers: int = 3, seed: int = 0, dropout: float = 0.0, init_lora_weights=False):
    """A tiny BERT with LoRA on q/k/v; B is random (not zero) so adapters change the output."""
    from peft import LoraConfig, get_peft_model

    model = tiny_bert(layers, seed)
    config = LoraConfig(r=2, lora_alpha=1, lora_dropout=dropout, use_rslora=True,
                        target_modules=["query", "key", "value"], init_lora_weights=init_lora_weights)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, config)


@pytest.fixture
def tiny_inputs():
    torch.manual_seed(123)
    ids = torch.randint(1, 64, (4, 7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
