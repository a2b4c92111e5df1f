"""Training runs for experiments: reuse finished ones, run independent ones in parallel processes.

Why: a suite trains hundreds of adapters. Every run an experiment starts has its own folder
(`adapter/` + `result.json`); `result.json` is written last and atomically, so its presence with
the same config means the run finished and its adapter is complete. A killed suite started again
reuses those runs instead of training them again, and never trusts a half-written one.
`run_all(..., jobs=N)` trains the missing runs in N worker processes (each with cores / N torch
threads); the results are identical to the sequential path because every run is seeded by its
config alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

from copra.adapters import load_adapter
from copra.config import TrainConfig
from copra.errors import UserError
from copra.training import RunResult, train

IGNORED = ("progress",)  # config fields that do not change what a run produces


def finished(config: TrainConfig, output_dir: str | Path) -> RunResult | None:
    """The recorded result of this exact run in `output_dir`, with its adapter state, or None."""
    out = Path(output_dir)
    try:
        record = json.loads((out / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # never run, or not finished
    stored = {k: v for k, v in (record.get("config") or {}).items() if k not in IGNORED}
    wanted = {k: v for k, v in json.loads(json.dumps(config.to_dict())).items() if k not in IGNORED}
    if stored != wanted or not (out / "adapter" / "adapter_model.safetensors").is_file():
        return None
    known = {f.name for f in dataclasses.fields(RunResult)}
    result = RunResult(**{k: v for k, v in record.items() if k in known})
    result.state, _ = load_adapter(out / "adapter")
    result.adapter_dir = str(out / "adapter")  # where it is now, even if the results folder moved
    result.early_dir = str(out / "early") if result.early_dir else None
    return result


def train_or_reuse(config: TrainConfig, output_dir: str | Path) -> RunResult:
    """`train(config, output_dir=...)` unless that run already finished there."""
    return finished(config, output_dir) or train(config, output_dir=output_dir)


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _train_in_worker(config: TrainConfig, output_dir: str) -> str:
    train(config.replace(progress=False), output_dir=output_dir)
    return output_dir


def run_all(runs: Sequence[tuple[TrainConfig, str | Path]], jobs: int = 1) -> list[RunResult]:
    """Results of every (config, output folder), in order; finished runs are reused, the rest trained.

    With `jobs` > 1 the missing runs train in that many spawned processes; their adapters come back
    through the folders (never pickled), read by `finished`.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"jobs must be a positive integer, got {jobs!r}")
    results: list[RunResult | None] = [finished(c, d) for c, d in runs]
    missing = [i for i, r in enumerate(results) if r is None]
    if jobs == 1 or len(missing) <= 1:
        for i in missing:
            results[i] = train(runs[i][0], output_dir=runs[i][1])
        return results  # type: ignore[return-value]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=min(jobs, len(missing)), mp_context=get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {i: pool.submit(_train_in_worker, runs[i][0], str(runs[i][1])) for i in missing}
        for i, future in futures.items():
            future.result()  # re-raises a worker's error (a UserError stays one)
            results[i] = finished(*runs[i])
            if results[i] is None:
                raise RuntimeError(f"run in {runs[i][1]} finished but left no readable result")
    return results  # type: ignore[return-value]
