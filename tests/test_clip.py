"""CLIP backbone and CoOp data: a tiny random-init CLIPModel + tokenizer and tiny images on disk, no network."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import copra
from copra.core.config import make_config
from copra.core.gates import lora_modules
from copra.data.coop import COOP_DATASETS, load_coop_task
from copra.utils.errors import UserError

CLASSES = ("dots", "lines", "zig_zag")
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.5)


def write_tiny_clip(folder: Path) -> Path:
    """Random-init CLIPModel, a character-level CLIP tokenizer and a preprocessor config in `folder`."""
    from transformers import CLIPConfig, CLIPModel

    chars = list(string.ascii_lowercase) + [".", ",", "'"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(chars)})
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tiny_clip_tokenizer(vocab, folder).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return folder


def tiny_clip_tokenizer(vocab: dict, folder: Path):
    """transformers 5 builds a tokenizer from a vocabulary dict; 4.x only from vocab/merges files."""
    import transformers
    from transformers import CLIPTokenizer

    if int(transformers.__version__.split(".")[0]) >= 5:
        return CLIPTokenizer(vocab=vocab, merges=[])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))


def write_image(path: Path, seed: int, size=(40, 36)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def write_dtd(root: Path, train: int = 3, test: int = 2) -> Path:
    """CoOp's DTD layout: <root>/dtd/images/<class>/*.jpg + split_zhou_DescribableTextures.json."""
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    seed = 0
    for label, name in enumerate(CLASSES):
        for part, count in (("train", train), ("val", 1), ("test", test)):
            for i in range(count):
                relative = f"{name}/{part}_{i}.jpg"
                write_image(root / "dtd" / "images" / relative, seed)
                seed += 1
                split[part].append([relative, label, name])
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_dtd(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def config(clip_dir, data_root):
    return make_config(
        {
            "preset": "clip-lora",
            "model": str(clip_dir),
            "data_root": str(data_root),
            "task": "dtd",
            "shots": 2,
            "steps": 3,
            "batch_size": 4,
            "eval_examples": None,
            "progress": False,
        }
    )


@pytest.fixture(scope="module")
def classifier(config):
    from copra.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier(config)
    model.set_prompts(load_coop_task(config.data_root, "dtd").prompts())
    return model


# ----------------------------------------------------------------------------- CoOp data


def test_registry():
    assert set(COOP_DATASETS) == {
        "imagenet",
        "caltech101",
        "oxford_pets",
        "stanford_cars",
        "oxford_flowers",
        "food101",
        "fgvc_aircraft",
        "sun397",
        "dtd",
        "eurosat",
        "ucf101",
    }
    assert COOP_DATASETS["dtd"].split_file == "split_zhou_DescribableTextures.json"
    assert COOP_DATASETS["dtd"].coop_template == "{} texture."


def test_load_dtd(data_root):
    task = load_coop_task(str(data_root), "dtd")
    assert task.name == "dtd" and task.num_classes == 3
    assert task.class_names == ("dots", "lines", "zig zag")
    assert task.prompts() == ["a photo of a dots.", "a photo of a lines.", "a photo of a zig zag."]
    assert load_coop_task(data_root, "dtd", template_style="coop").prompts()[2] == "zig zag texture."
    assert len(task.train_images) == 9 and len(task.test_images) == 6
    assert task.train_labels == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in task.train_images + task.test_images)
    assert "train_images" not in repr(task)


def test_coop_errors(tmp_path, data_root):
    with pytest.raises(UserError, match="needs data_root"):
        load_coop_task(None, "dtd")
    with pytest.raises(UserError, match="not a folder"):
        load_coop_task(tmp_path / "nowhere", "dtd")
    with pytest.raises(UserError, match="unknown image data set 'cifar'.*eurosat"):
        load_coop_task(data_root, "cifar")
    with pytest.raises(UserError, match="expected the folder .*eurosat"):
        load_coop_task(data_root, "eurosat")
    (tmp_path / "dtd").mkdir()
    with pytest.raises(UserError, match="split file not found: .*split_zhou_DescribableTextures.json"):
        load_coop_task(tmp_path, "dtd")
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_coop_task(tmp_path, "dtd")
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps({"train": [["a.jpg", 0]]}))
    with pytest.raises(UserError, match="'train' and 'test'"):
        load_coop_task(tmp_path, "dtd")


def test_missing_image(tmp_path):
    root = write_dtd(tmp_path, train=2, test=1)
    (root / "dtd" / "images" / "lines" / "test_0.jpg").unlink()
    with pytest.raises(UserError, match=r"missing: .*lines.test_0\.jpg"):
        load_coop_task(root, "dtd")


def test_fgvc_and_imagenet_layouts(tmp_path):
    fgvc = tmp_path / "fgvc_aircraft"
    fgvc.mkdir()
    (fgvc / "variants.txt").write_text("707-320\nA300B4\n")
    for split in ("train", "test"):
        lines = [f"{split}{i} {variant}" for i, variant in enumerate(["707-320", "A300B4"])]
        (fgvc / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for i in range(2):
            write_image(fgvc / "images" / f"{split}{i}.jpg", i)
    task = load_coop_task(tmp_path, "fgvc_aircraft")
    assert task.class_names == ("707-320", "A300B4") and task.test_labels == (0, 1)
    net = tmp_path / "imagenet"
    (net / "classnames.txt").parent.mkdir()
    (net / "classnames.txt").write_text("n01 tench\nn02 great white shark\n")
    for split in ("train", "val"):
        for label, wnid in enumerate(["n01", "n02"]):
            write_image(net / "images" / split / wnid / "a.JPEG", label)
    task = load_coop_task(tmp_path, "imagenet")
    assert task.class_names == ("tench", "great white shark") and task.train_labels == (0, 1)
    (net / "images" / "val" / "n02" / "a.JPEG").rename(net / "images" / "val" / "b.JPEG")
    (net / "images" / "val" / "n02").rmdir()
    with pytest.raises(UserError, match="class folder not found"):
        load_coop_task(tmp_path, "imagenet")


def test_user_data_files_must_be_utf8(tmp_path):
    """A CoOp split file, variant list or class list that is not UTF-8 names the file and the byte."""
    root = write_dtd(tmp_path / "dtd_root", train=1, test=1)
    split = root / "dtd" / "split_zhou_DescribableTextures.json"
    split.write_bytes(split.read_bytes().replace(b"lines", b"l\xefnes", 1).replace(b"\xef", b"\xe9"))
    with pytest.raises(
        UserError, match=r"split_zhou_DescribableTextures\.json is not UTF-8 text \(byte 0xe9 at offset \d+\)"
    ):
        load_coop_task(root, "dtd")
    fgvc = tmp_path / "fgvc_aircraft"
    fgvc.mkdir()
    (fgvc / "variants.txt").write_bytes(b"707-320\nA300\xb4\n")
    with pytest.raises(UserError, match=r"variants\.txt is not UTF-8 text \(byte 0xb4"):
        load_coop_task(tmp_path, "fgvc_aircraft")
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_bytes(b"n01 tench\nn02 \xff\xfe\n")
    with pytest.raises(UserError, match=r"classnames\.txt is not UTF-8 text \(byte 0xff"):
        load_coop_task(tmp_path, "imagenet")


# ----------------------------------------------------------------------------- CLIP classifier


def test_classifier_shapes_and_lora(classifier, data_root):
    task = load_coop_task(data_root, "dtd")
    inputs = classifier.inputs_for(task.train_images[:4])
    assert inputs["pixel_values"].shape == (4, 3, 32, 32)
    classifier.eval()
    with torch.no_grad():
        logits = classifier(**inputs)
        texts = classifier.class_embeddings()
        images = classifier.embed(**inputs)
    assert logits.shape == (4, 3) and classifier.scale == 100.0
    assert texts.shape == (3, 8) and torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(logits, 100.0 * images @ texts.T, atol=1e-4)
    names = [name for name, _ in lora_modules(classifier.encoder)]
    for tower in ("text_model", "vision_model"):
        for layer in (0, 1):
            for proj in ("q_proj", "k_proj", "v_proj"):
                assert f"{tower}.encoder.layers.{layer}.self_attn.{proj}" in names
    assert len(names) == 12
    gates = copra.CopRA(classifier.encoder, 10)
    try:
        assert gates.players == [
            "text_model.encoder.layers.0",
            "text_model.encoder.layers.1",
            "vision_model.encoder.layers.0",
            "vision_model.encoder.layers.1",
        ]
    finally:
        gates.remove()
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_preprocessing(classifier, tmp_path):
    path = tmp_path / "flat.png"
    Image.new("RGB", (64, 48), (255, 102, 0)).save(path)
    pixels = classifier.inputs_for([path])["pixel_values"][0]  # resize to 42x32, centre crop 32x32
    expected = (torch.tensor([1.0, 0.4, 0.0]) - torch.tensor(MEAN)) / torch.tensor(STD)  # preprocessor config
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels, expected[:, None, None].expand(3, 32, 32), atol=0.05)
    images = [tmp_path / f"{i}.png" for i in range(3)]
    for i, image in enumerate(images):
        write_image(image, 100 + i, size=(50, 40))
    assert torch.equal(classifier.inputs_for(images)["pixel_values"], classifier.inputs_for(images)["pixel_values"])
    torch.manual_seed(7)
    first = classifier.inputs_for(images, train=True)["pixel_values"]
    torch.manual_seed(7)
    again = classifier.inputs_for(images, train=True)["pixel_values"]
    torch.manual_seed(8)
    other = classifier.inputs_for(images, train=True)["pixel_values"]
    assert first.shape == (3, 3, 32, 32) and torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(UserError, match="image not found: .*nope.png"):
        classifier.inputs_for([tmp_path / "nope.png"])


def test_bad_model(tmp_path, config):
    from copra.models.clip import build_clip_classifier

    with pytest.raises(UserError, match="cannot load the CLIP model .*empty"):
        build_clip_classifier(config.replace(model=str(tmp_path / "empty")))
    from conftest import tiny_bert

    tiny_bert().save_pretrained(tmp_path / "bert")
    with pytest.raises(UserError, match="BertConfig, not a CLIP model"):
        build_clip_classifier(config.replace(model=str(tmp_path / "bert")))


def test_train_end_to_end(config, clip_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import CLIPModel

    import copra.models
    from copra.models.clip import ClipClassifier
    from copra.training.loop import train
    from copra.utils.precision import cast_frozen

    built = []
    original = copra.models.build_classifier
    monkeypatch.setattr(copra.models, "build_classifier", lambda cfg: built.append(original(cfg)) or built[-1])
    result = train(config, output_dir=tmp_path / "run")
    assert 0.0 <= result.accuracy <= 1.0 and np.isfinite(result.final_loss)
    adapter = Path(result.adapter_dir)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    trained = built[0].eval()
    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(clip_dir), str(adapter)).eval()
    assert any(float(p.abs().sum()) > 0 for n, p in loaded.named_parameters() if "lora_B" in n)
    reloaded = ClipClassifier(loaded, trained.tokenizer, image_size=32, mean=MEAN, std=STD)
    reloaded.precision = trained.precision  # the run's precision ("auto": bf16 on a CPU with bf16), same arithmetic
    cast_frozen(reloaded.encoder, trained.precision)
    task = load_coop_task(config.data_root, "dtd")
    pixels = trained.inputs_for(task.test_images)["pixel_values"]
    with torch.no_grad():
        assert torch.allclose(trained.embed(pixels), reloaded.embed(pixels), atol=1e-6)
        base = ClipClassifier(
            CLIPModel.from_pretrained(clip_dir).eval(), trained.tokenizer, image_size=32, mean=MEAN, std=STD
        )
        assert not torch.allclose(trained.embed(pixels), base.embed(pixels), atol=1e-7)
