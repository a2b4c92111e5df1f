"""Training through Hugging Face Accelerate: one process unchanged, two data-parallel processes agree."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from copra.training.loop import make_accelerator, train

ARGS = [
    "--set",
    "steps=6",
    "--set",
    "shots=2",
    "--set",
    "batch_size=4",
    "--set",
    "eval_examples=20",
    "--set",
    "max_length=16",
    "--set",
    "progress=false",
    "--set",
    "method=copra",
    "--set",
    "lora_dropout=0.0",
    # fp32: under bf16 autocast two half-batches round differently from one batch, far above 1e-5
    "--set",
    "precision=fp32",
]


def test_single_process_accelerator_is_a_plain_cpu_run():
    accelerator = make_accelerator()
    assert (
        accelerator.num_processes == 1 and accelerator.is_main_process and accelerator.device.type in ("cpu", "cuda")
    )


@pytest.mark.slow
def test_two_processes_train_the_same_adapter_as_one(tiny_text_model, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU): each process takes half of every batch, DDP averages
    the gradients, so the adapter equals the one-process adapter up to float rounding; one process writes."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "copra.cli",
        "train",
        "--set",
        f"model={tiny_text_model}",
        "--set",
        f"output_dir={tmp_path / 'ddp'}",
        *ARGS,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("accuracy") == 2 and "-> None" in done.stdout  # rank 1 wrote nothing
    from copra.core.config import make_config

    train(
        make_config(
            {
                "model": tiny_text_model,
                "steps": 6,
                "shots": 2,
                "batch_size": 4,
                "eval_examples": 20,
                "max_length": 16,
                "progress": False,
                "method": "copra",
                "lora_dropout": 0.0,
                "precision": "fp32",
            }
        ),
        output_dir=tmp_path / "one",
    )
    parallel = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert parallel.keys() == reference.keys()
    assert any(float(v.abs().max()) > 1e-3 for k, v in reference.items() if "lora_B" in k)  # it trained
    for key in reference:
        torch.testing.assert_close(parallel[key], reference[key], atol=1e-5, rtol=1e-4)
