"""Tiny random-init models shared by the unit tests (peft's tests/test_custom_models.py spirit)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: threading overhead dominates, and CI has 2 cores


def tiny_bert(layers: int = 3, seed: int = 0, attention: str | None = None):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **({"attn_implementation": attention} if attention else {}),
    )
    return BertModel(config, add_pooling_layer=False).eval()


def tiny_lora_bert(
    layers: int = 3,
    seed: int = 0,
    dropout: float = 0.0,
    init_lora_weights=False,
    attention: str | None = None,
    use_dora: bool = False,
):
    """A tiny BERT with LoRA (or DoRA) on q/k/v; B is random (not zero) so adapters change the output."""
    from peft import LoraConfig, get_peft_model

    model = tiny_bert(layers, seed, attention)
    config = LoraConfig(
        r=2,
        lora_alpha=1,
        lora_dropout=dropout,
        use_rslora=True,
        use_dora=use_dora,
        target_modules=["query", "key", "value"],
        init_lora_weights=init_lora_weights,
    )
    torch.manual_seed(seed + 1)
    return get_peft_model(model, config)


@pytest.fixture
def tiny_inputs():
    torch.manual_seed(123)
    ids = torch.randint(1, 64, (4, 7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def save_tiny_text_model(folder, layers: int = 3, seed: int = 0):
    """A tiny random BERT + WordPiece tokenizer saved like a hub checkpoint (offline stand-in for MiniLM)."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = (
        "the a of to and in is was for on that with as by at it from this news article about review drug "
        "business sport sports politics technology entertainment tech good bad neutral positive negative "
        "party speech government people said year new market film music game"
    ).split()
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + letters + ["##" + c for c in letters]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(str(folder))  # positional: v5 ignores vocab_file=
    model = tiny_bert(layers, seed)
    model.config.vocab_size = len(vocab)
    model.resize_token_embeddings(len(vocab))
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory):
    """Path of a saved tiny text encoder, usable as TrainConfig.model."""
    return str(save_tiny_text_model(tmp_path_factory.mktemp("tiny_text_model")))


def tiny_run_config(model_path: str, **overrides):
    """A TrainConfig that trains the tiny encoder on a real task in about a second."""
    from copra.core.config import make_config

    values = dict(
        model=model_path,
        task="bbc_news",
        shots=2,
        steps=4,
        batch_size=4,
        eval_examples=20,
        max_length=16,
        progress=False,
    )
    return make_config(values | overrides)


def run_with_random_b(model_path: str, eval_examples: int):
    """(config, classifier, data): a tiny classifier whose LoRA B is random, so adapters change its scores."""
    from copra.training.loop import build_run

    config = tiny_run_config(model_path, eval_examples=eval_examples)
    classifier, data = build_run(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in classifier.encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 2.0)
    return config, classifier, data


def lora_adapter_config(config) -> dict:
    """The adapter_config.json fields of a run's LoRA (what `Evaluator.accuracy` reads)."""
    return {
        "r": config.rank,
        "lora_alpha": config.lora_alpha,
        "target_modules": list(config.target_modules),
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
    }


def interrupted_run(config, out, at_step: int, monkeypatch) -> None:
    """Train `config` into `out` until the checkpoint of `at_step` is written, then stop as if killed."""
    from copra.training import loop as training

    real = training._save_checkpoint

    def save_then_die(out_, step, *args):
        folder = real(out_, step, *args)
        if step == at_step:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(training, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, output_dir=out)
    monkeypatch.setattr(training, "_save_checkpoint", real)


def train_sets(model: str, out, **extra) -> list[str]:
    """`--set key=value` arguments for a tiny checkpointing `copra train` run into `out`."""
    values = (
        dict(
            model=model,
            task="parl_party",
            shots=2,
            steps=4,
            batch_size=4,
            eval_examples=12,
            max_length=16,
            progress="false",
            checkpoint_every=1,
            output_dir=str(out),
        )
        | extra
    )
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def files_under(folder) -> list[str]:
    """Every path below `folder`, relative and sorted ([] when it does not exist)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def train_lora_and_copra(model_path: str, out, **overrides):
    """A LoRA and a CopRA adapter of the tiny encoder, trained on the same data: (data, {method: [folder]})."""
    from copra.models.evaluation import prepare_data
    from copra.training.loop import train

    config = tiny_run_config(model_path, **({"steps": 6, "lr": 0.3} | overrides))
    data = prepare_data(config)
    adapters = {}
    for method in ("lora", "copra"):
        train(config.replace(method=method), data=data, output_dir=out / method)
        adapters[method] = [str(out / method / "adapter")]
    return data, adapters


def bar_heights(axes) -> list[list[float]]:
    """The heights of each `bar` call's bars on `axes` (a matplotlib Axes), in drawing order."""
    from matplotlib.container import BarContainer

    return [[bar.get_height() for bar in c] for c in axes.containers if isinstance(c, BarContainer)]


def errorbar_data(axes) -> list[tuple[list[float], list[float]]]:
    """(x, y) of each `errorbar` call's line on `axes`, in drawing order (bars' error bars excluded)."""
    from matplotlib.container import ErrorbarContainer

    return [
        (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata()))
        for c in axes.containers
        if isinstance(c, ErrorbarContainer) and c.lines[0] is not None
    ]
