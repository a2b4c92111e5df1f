"""Saved adapters name a base other machines can find (a hub id, not this venv's folder), and copra
still reloads, merges and prunes them offline: it rebuilds the base from copra.json, never from that name."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from copra.adapters.io import CONFIG_FILE, load_adapter, save_peft_model
from copra.adapters.ops import merge_folders, prune_folder
from copra.models.base_model import EMBEDDED_HUB_ID, embedded_model_path, hub_name
from copra.training.loop import build_run

from conftest import tiny_run_config


def _base_name(folder) -> str:
    return json.loads((Path(folder) / CONFIG_FILE).read_text())["base_model_name_or_path"]


def test_hub_name_of_each_kind_of_model():
    assert hub_name("embedded:minilm") == EMBEDDED_HUB_ID
    assert hub_name("/data/hub/models--openai--clip-vit-base-patch16/snapshots/57c2") == "openai/clip-vit-base-patch16"
    assert hub_name("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"
    assert hub_name("models/my-encoder") == "models/my-encoder"  # a folder of one's own: as given
    assert hub_name("/x/models--/snapshots/a") == "/x/models--/snapshots/a"


def test_a_local_folder_is_recorded_as_given(tiny_text_model, tmp_path):
    classifier, _ = build_run(tiny_run_config(tiny_text_model))
    assert _base_name(save_peft_model(classifier.encoder, tmp_path / "adapter")) == tiny_text_model


def _hub_cache_holding_the_embedded_encoder(root: Path) -> Path:
    """A Hugging Face hub cache as another machine that downloaded all-MiniLM-L6-v2 would have it."""
    repo = root / ("models--" + EMBEDDED_HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for file in embedded_model_path().iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return root


@pytest.mark.real_model
def test_embedded_adapter_names_the_hub_id_and_loads_offline_everywhere(tmp_path, recwarn):
    from peft import AutoPeftModel, PeftModel
    from transformers import AutoModel

    from copra.models.evaluation import load_adapter_state, state_accuracy
    from copra.training.loop import train

    config = tiny_run_config("embedded:minilm", steps=2, shots=1, eval_examples=10, lr=1e-2, precision="fp32")
    result = train(config, output_dir=tmp_path / "run")
    folder = Path(result.adapter_dir)
    assert _base_name(folder) == EMBEDDED_HUB_ID
    assert json.loads((folder / "copra.json").read_text())["config"]["model"] == "embedded:minilm"

    # copra offline: reload and evaluate (the same accuracy), prune, merge; the outputs keep the hub id
    classifier, data = build_run(config)
    state, _ = load_adapter(folder)
    assert state_accuracy(classifier, state, data) == result.accuracy
    pruned = prune_folder(folder, output=tmp_path / "pruned", sparsity=0.5)
    merged = merge_folders([folder, pruned], "fusion", output=tmp_path / "merged")
    peft_merged = merge_folders([folder, pruned], "ties", density=0.5, output=tmp_path / "ties")
    assert _base_name(pruned) == _base_name(merged) == _base_name(peft_merged) == EMBEDDED_HUB_ID
    load_adapter(merged), load_adapter(peft_merged)
    # nothing above asked the hub: PEFT warns when it cannot check a hub id offline
    assert not [str(w.message) for w in recwarn if EMBEDDED_HUB_ID in str(w.message)]

    # PEFT on the locally loaded base: the same encoder the run trained
    inputs = classifier.tokenize(data.eval_x[:3])
    load_adapter_state(classifier, state)
    classifier.eval()
    with torch.no_grad():
        expected = classifier.encoder(**inputs).last_hidden_state
        base = AutoModel.from_pretrained(str(embedded_model_path()), add_pooling_layer=False)
        peft = PeftModel.from_pretrained(base, str(folder)).eval()
        torch.testing.assert_close(peft(**inputs).last_hidden_state, expected)
        # AutoPeftModel finds the base by the recorded name, here in a hub cache, offline
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the hub checkpoint's unused pooler
            auto = AutoPeftModel.from_pretrained(
                str(folder), cache_dir=str(_hub_cache_holding_the_embedded_encoder(tmp_path / "hub"))
            ).eval()
        torch.testing.assert_close(auto(**inputs).last_hidden_state, expected)
