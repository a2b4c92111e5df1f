"""Training-step time of CopRA vs plain PEFT LoRA on the embedded encoder, over a whole schedule.

Same data, same batches (batch 32 x 64 tokens), same number of steps; only the method differs.
Also prints the forward-only time (no gradients) as the floor. Run: `make bench` or
`.venv/bin/python benchmarks/step_time.py --steps 40`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from copra.config import make_config
from copra.training import batches, build_run, train


def forward_only(config, steps: int) -> float:
    classifier, data = build_run(config)
    classifier.eval()
    order = batches(len(data.train_x), config.batch_size, config.seed)
    times = []
    with torch.no_grad():
        for _ in range(steps):
            start = time.perf_counter()
            classifier(**classifier.inputs_for([data.train_x[i] for i in next(order)]))
            times.append(time.perf_counter() - start)
    return statistics.fmean(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps T of the schedule")
    parser.add_argument("--task", default="bbc_news", help="long texts: every batch is full 64 tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of every variant")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = make_config(dict(task=args.task, steps=args.steps, batch_size=32, max_length=64, shots=16,
                              eval_examples=10, progress=False))
    # warm-up (allocator, kernels) so the first measured method is not penalised
    train(config.replace(method="lora", steps=3))
    variants = {"lora": config.replace(method="lora"), "copra": config.replace(method="copra"),
                "copra, skipping only": config.replace(method="copra", prefix_cache=False)}
    # the variants take turns, `repeats` rounds: slow drifts of the machine hit all of them alike
    step_times: dict[str, list[float]] = {name: [] for name in variants}
    results = {}
    for _ in range(args.repeats):
        for name, variant in variants.items():
            results[name] = train(variant)
            step_times[name] += results[name].step_seconds
    floor = forward_only(config, min(args.steps, 20))
    lora, copra, skip_only = (statistics.fmean(step_times[name]) for name in variants)
    print(f"encoder all-MiniLM-L6-v2, task {args.task}, batch 32 x 64 tokens, T={args.steps}, "
          f"threads {torch.get_num_threads()}, {args.repeats} alternating rounds")
    print(f"LoRA   {lora:.3f} s/step")
    print(f"CopRA  {copra:.3f} s/step   (mean active fraction {results['copra'].mean_active_fraction:.2f})")
    print(f"CopRA without the frozen-prefix cache (adapter skipping only) {skip_only:.3f} s/step")
    print(f"forward-only floor {floor:.3f} s/step")
    print(f"ratio CopRA / LoRA over the whole schedule: {copra / lora:.3f} "
          f"(skipping only: {skip_only / lora:.3f})")
    masks = results["copra"].masks
    depth = statistics.fmean(depth_fraction(mask) for mask in masks)
    print(f"blocks from the lowest active one up, as a fraction of all (drawn masks): {depth:.3f}\n"
          "  (what the ratio tends to when step time is proportional to that depth, i.e. when the\n"
          "   frozen prefix costs nothing and the rank-2 LoRA matmuls are negligible)")
    by_lowest: dict[int, list[float]] = {}
    for mask, seconds in zip(masks * args.repeats, step_times["copra"]):
        by_lowest.setdefault(mask.index(True), []).append(seconds)
    print("CopRA step time by lowest active block: " + ", ".join(
        f"{k}: {statistics.fmean(v):.3f}s (n={len(v)})" for k, v in sorted(by_lowest.items())))


def depth_fraction(mask: list[bool]) -> float:
    """Share of blocks a step must run forward and backward through: the lowest active one and above."""
    return (len(mask) - mask.index(True)) / len(mask)

if __name__ == "__main__":
    main()
