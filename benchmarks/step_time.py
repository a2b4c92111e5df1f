"""Training-step time of CopRA vs plain PEFT LoRA on the embedded encoder, in fp32 and bf16, against the machine's peak.

Same data, same batches (batch 32 x 64 tokens), same number of steps; only the method and the
precision differ. Also:
- the machine's GEMM throughput (fp32 and bf16) on the encoder's matmul shapes at this batch
  (q/k/v/output 384x384, FFN 384x1536 and 1536x384, M = batch x tokens rows): the "peak";
- the FLOPs of each method's step (counted by `torch.utils.flop_counter.FlopCounterMode` over a
  whole schedule, so CopRA's skipped blocks and cache fills are counted as they happen);
- each method's achieved fraction of that precision's peak, and the forward-only time as the floor.
Run: `make bench` or `.venv/bin/python benchmarks/step_time.py --steps 40`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from copra.core.config import make_config
from copra.training.loop import batches, build_run, train
from copra.utils.compat import quiet_known_warnings
from copra.utils.precision import DTYPES, resolve

HIDDEN, FFN = 384, 1536  # all-MiniLM-L6-v2
# (in, out, uses per block): query, key, value, attention output; FFN up; FFN down
SHAPES = ((HIDDEN, HIDDEN, 4), (HIDDEN, FFN, 1), (FFN, HIDDEN, 1))


def gemm_peak(rows: int, dtype: torch.dtype, repeats: int = 20) -> tuple[float, dict]:
    """(GFLOP/s of one block's GEMMs in the mix the encoder runs them, GFLOP/s per shape); best of `repeats`."""
    per_shape, flops, seconds = {}, 0.0, 0.0
    for k, n, uses in SHAPES:
        x, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        F.linear(x, w)  # warm-up (oneDNN primitives)
        best = min(_timed(lambda: F.linear(x, w)) for _ in range(repeats))
        per_shape[f"{rows}x{k} @ {k}x{n}"] = 2 * rows * k * n / best / 1e9
        flops, seconds = flops + uses * 2 * rows * k * n, seconds + uses * best
    return flops / seconds / 1e9, per_shape


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_per_step(config) -> float:
    """FLOPs of one optimizer step, averaged over the schedule (forward + backward, every matmul and conv)."""
    with FlopCounterMode(display=False) as counter:
        train(config.replace(eval_examples=1, checkpoint_every=0))  # the final evaluation: 1 text, negligible
    return counter.get_total_flops() / config.steps


def forward_only(config, steps: int) -> tuple[float, float]:
    """(seconds, FLOPs) of a forward pass without gradients (eval mode), the floor of a step."""
    classifier, data = build_run(config)
    classifier.eval()
    order = batches(len(data.train_x), config.batch_size, config.seed)
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            inputs = classifier.inputs_for([data.train_x[i] for i in next(order)])
            start = time.perf_counter()
            classifier(**inputs)
            times.append(time.perf_counter() - start)
        with FlopCounterMode(display=False) as counter:
            classifier(**inputs)
    return statistics.fmean(times[1:]), counter.get_total_flops()


def main() -> None:
    quiet_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps T of the schedule")
    parser.add_argument("--task", default="bbc_news", help="long texts: every batch is full 64 tokens")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of every variant")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated precisions to compare")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    base = make_config(
        dict(
            task=args.task,
            steps=args.steps,
            batch_size=args.batch_size,
            max_length=64,
            shots=16,
            eval_examples=10,
            progress=False,
        )
    )
    rows = args.batch_size * base.max_length
    variants = {
        (prec, name): base.replace(precision=prec, **changes)
        for prec in precisions
        for name, changes in (
            ("lora", dict(method="lora")),
            ("copra", dict(method="copra")),
            ("copra, skipping only", dict(method="copra", prefix_cache=False)),
        )
    }
    for prec in precisions:  # warm-up (allocator, kernels) so the first measured variant is not penalised
        train(base.replace(method="lora", steps=3, precision=prec))
    # the variants take turns, `repeats` rounds: slow drifts of the machine hit all of them alike
    step_times: dict[tuple, list[float]] = {key: [] for key in variants}
    results = {}
    for _ in range(args.repeats):
        for key, variant in variants.items():
            results[key] = train(variant)
            step_times[key] += results[key].step_seconds
    mean = {key: statistics.fmean(times) for key, times in step_times.items()}
    flops = {
        name: flops_per_step(base.replace(method=m, prefix_cache=name != "copra, skipping only"))
        for name, m in (("lora", "lora"), ("copra", "copra"), ("copra, skipping only", "copra"))
    }
    peaks = {prec: gemm_peak(rows, DTYPES[prec]) for prec in precisions}
    floors = {prec: forward_only(base.replace(precision=prec), min(args.steps, 20)) for prec in precisions}

    print(
        f"encoder all-MiniLM-L6-v2, task {args.task}, batch {args.batch_size} x 64 tokens, T={args.steps}, "
        f"threads {torch.get_num_threads()}, {args.repeats} alternating rounds; precision auto = {resolve('auto')}"
    )
    for prec in precisions:
        peak, per_shape = peaks[prec]
        print(
            f"GEMM peak {prec}: {peak:.0f} GFLOP/s (block mix); "
            + ", ".join(f"{s}: {g:.0f}" for s, g in per_shape.items())
        )
    print(f"{'':22s}" + "".join(f"{prec:>28s}" for prec in precisions))
    for name in ("lora", "copra", "copra, skipping only"):
        cells = []
        for prec in precisions:
            seconds = mean[prec, name]
            achieved = flops[name] / seconds / 1e9
            cells.append(f"{seconds:.3f} s  {flops[name] / 1e9:5.1f} GF  {100 * achieved / peaks[prec][0]:4.1f}%")
        print(f"{name:22s}" + "".join(f"{c:>28s}" for c in cells))
    cells = [
        f"{floors[p][0]:.3f} s  {floors[p][1] / 1e9:5.1f} GF  {100 * floors[p][1] / floors[p][0] / 1e9 / peaks[p][0]:4.1f}%"
        for p in precisions
    ]
    print(f"{'forward-only floor':22s}" + "".join(f"{c:>28s}" for c in cells))
    print("  (each cell: mean s/step, GFLOP per step, achieved fraction of that precision's GEMM peak)")
    for prec in precisions:
        lora, copra, skip = (mean[prec, n] for n in ("lora", "copra", "copra, skipping only"))
        print(
            f"{prec}: ratio CopRA / LoRA over the whole schedule {copra / lora:.3f} (skipping only: {skip / lora:.3f}); "
            f"mean active fraction {results[prec, 'copra'].mean_active_fraction:.2f}"
        )
    if "fp32" in precisions:
        for prec in precisions:
            if prec != "fp32":
                peak_ratio = peaks["fp32"][0] / peaks[prec][0]
                print(
                    f"LoRA step {prec} / fp32: {mean[prec, 'lora'] / mean['fp32', 'lora']:.3f}  (this machine's GEMM "
                    f"peaks: {prec} {1 / peak_ratio:.2f}x fp32, so a {prec} step as efficient as the fp32 one "
                    f"would take {peak_ratio:.3f}x)"
                )
    masks = results[precisions[0], "copra"].masks
    depth = statistics.fmean(depth_fraction(mask) for mask in masks)
    print(
        f"blocks from the lowest active one up, as a fraction of all (drawn masks): {depth:.3f}\n"
        "  (what the ratio tends to when step time is proportional to that depth, i.e. when the\n"
        "   frozen prefix costs nothing and the rank-2 LoRA matmuls are negligible)"
    )


def depth_fraction(mask: list[bool]) -> float:
    """Share of blocks a step must run forward and backward through: the lowest active one and above."""
    return (len(mask) - mask.index(True)) / len(mask)


if __name__ == "__main__":
    main()
