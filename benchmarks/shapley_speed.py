"""Coalitions per second of CopRA's prefix-sharing coalition evaluator vs one full forward per coalition.

Exact Shapley values over the 6 layer players of the embedded all-MiniLM-L6-v2 need all 2^6 = 64
coalitions. The naive loop (copra.models.evaluation.accuracy under `gates.active(mask)`) runs 6 blocks per
coalition (384 block runs); the evaluator walks the prefix trie (2 + 4 + ... + 64 = 126 block runs),
computes the frozen q/k/v projections once per pair of sibling branches, and shares the embeddings.
Both evaluate the same masks and must agree. The LoRA B matrices are randomised (seeded) so that
switching a layer changes the model. One torch thread by default: on a shared machine that keeps the
wall-clock ratio steady (CPU seconds are printed too). Takes about 5 minutes on one core.
Run: `.venv/bin/python benchmarks/shapley_speed.py [--eval-examples 200] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from copra.analysis.coalitions import CoalitionEvaluator, shapley_for_model
from copra.analysis.shapley import Game
from copra.core.config import make_config
from copra.core.gates import CopRA
from copra.training.loop import build_run
from copra.utils.compat import quiet_known_warnings


def all_masks(n: int) -> np.ndarray:
    index = np.arange(2**n)
    return ((index[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)


def main() -> None:
    quiet_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="bbc_news")
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--metric", default="accuracy", choices=["accuracy", "neg_loss"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = make_config(dict(task=args.task, eval_examples=args.eval_examples, progress=False))
    classifier, data = build_run(config)
    torch.manual_seed(0)
    with torch.no_grad():  # fresh LoRA has B = 0: give the adapters an effect
        for name, param in classifier.encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    gates = CopRA(classifier.encoder, total_steps=1)
    n = len(gates.players)
    masks = all_masks(n)
    evaluator = CoalitionEvaluator(classifier, gates, data, metric=args.metric, batch_size=args.batch_size)
    assert evaluator.fast, "the embedded encoder should take the prefix-sharing path"
    evaluator.values(masks[:2])  # warm-up (tokenization cache, allocator)

    game = Game(values=evaluator.values, n=n)  # its cache then serves shapley_for_model below
    start, cpu = time.perf_counter(), time.process_time()
    fast = game.evaluate(masks)
    fast_s, fast_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    naive = evaluator.naive_values(masks)
    naive_s, naive_cpu = time.perf_counter() - start, time.process_time() - cpu

    diff = np.abs(fast - naive)
    tolerance = 1.0 / len(data.eval_x) if args.metric == "accuracy" else 1e-4
    print(
        f"encoder all-MiniLM-L6-v2, task {args.task}, {len(data.eval_x)} eval examples, metric {args.metric}, "
        f"{n} layer players, {len(masks)} coalitions, batch {args.batch_size}, threads {torch.get_num_threads()}"
    )
    print(
        f"naive (one forward per coalition): {naive_s:7.2f} s  {len(masks) / naive_s:6.3f} coalitions/s  "
        f"(CPU {naive_cpu:.2f} s)"
    )
    print(
        f"prefix-sharing evaluator:          {fast_s:7.2f} s  {len(masks) / fast_s:6.3f} coalitions/s  "
        f"(CPU {fast_cpu:.2f} s)"
    )
    print(
        f"speed-up: {naive_s / fast_s:.2f}x wall, {naive_cpu / fast_cpu:.2f}x CPU   "
        f"max |v_fast - v_naive| = {diff.max():.2e} "
        f"({int((diff > 0).sum())} of {len(masks)} differ)"
    )
    print(f"v(empty) = {fast[0]:.4f}, v(full) = {fast[-1]:.4f}, range {fast.min():.4f}..{fast.max():.4f}")
    assert diff.max() <= tolerance, "fast and naive values disagree"
    result = shapley_for_model(classifier, gates, data, method="exact", metric=args.metric, game=game)
    assert result.evaluations == len(masks)  # all from the cache
    print("exact Shapley values: " + ", ".join(f"{p}={v:+.4f}" for p, v in zip(result.players, result.values)))
    print(f"sum {result.values.sum():+.4f} = v(full) - v(empty) = {result.v_full - result.v_empty:+.4f}")


if __name__ == "__main__":
    main()
