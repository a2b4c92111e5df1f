"""Training runs for experiments: reuse finished ones, run independent ones in parallel processes.

Why: a suite trains hundreds of adapters. Every run an experiment starts has its own folder
(`adapter/` + `result.json`); `result.json` is written last and atomically, so its presence with
the same config means the run finished and its adapter is complete. A killed suite started again
reuses those runs instead of training them again, and never trusts a half-written one.
A run killed mid-training continues from its last checkpoint (`copra.training.loop`, bit-identical).
`run_all(..., jobs=N)` trains the missing runs in N worker processes (each with cores / N torch
threads); the results are identical to the sequential path because every run is seeded by its
config alone. Each run holds its own folder's lock (`train` takes it, in the worker that trains it);
the parent only takes it briefly to read a run's state, never while a worker trains there.
`executor="ray"` trains them as Ray tasks instead (`ray_runs`), back through the same folders.

Inside `shared_runs(root)` (the converged suite) every run lives in `root/<method>-<task>-seed<k>-<hash>`
named by its config instead of the experiment's folder: experiments that need the same run (the
landscape, pruning, Shapley and crossover steps all train bbc_news at 16 shots) train it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from multiprocessing import get_context
from pathlib import Path

from copra.core.config import TrainConfig
from copra.experiments.runner.state import run_state
from copra.training.loop import RunResult, train
from copra.utils.errors import UserError

EXECUTORS = ("local", "ray")  # local: this process or `jobs` spawned processes; ray: one Ray task per run
_STORE: ContextVar[Path | None] = ContextVar("copra_run_store", default=None)
NOT_RUN_IDENTITY = ("output_dir", "progress", "report_to")  # where and how loudly a run trains, where it logs


def run_name(config: TrainConfig) -> str:
    """A folder name that only this run's config gives: readable prefix, hash of every other field."""
    identity = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_RUN_IDENTITY}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    task = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in config.task)[:40]
    return f"{config.method}-{task}-seed{config.seed}-{digest}"


@contextmanager
def shared_runs(root: str | Path):
    """Within this block, `run_all` trains (or reuses) every run in `root/run_name(config)`."""
    token = _STORE.set(Path(root))
    try:
        yield
    finally:
        _STORE.reset(token)


def _placed(runs: Sequence[tuple[TrainConfig, str | Path]]) -> list[tuple[TrainConfig, str | Path]]:
    """Each run's folder: the experiment's own, or inside `shared_runs` the store's. There every CopRA run
    keeps its early checkpoint (it changes no weight), so pruning's runs are everyone's runs."""
    store = _STORE.get()
    if store is None:
        return list(runs)
    return [(store_config(c), store / store_name(c)) for c, _ in runs]


def store_config(config: TrainConfig) -> TrainConfig:
    """The config a run trains with in a shared store: every CopRA run keeps its early checkpoint."""
    return config.replace(save_early=config.method == "copra")


def store_name(config: TrainConfig) -> str:
    """The folder name `config`'s run has inside `shared_runs` (where it trains as `store_config`)."""
    return run_name(store_config(config))


def finished(config: TrainConfig, output_dir: str | Path) -> RunResult | None:
    """The recorded result of this exact run in `output_dir`, with its adapter state, or None."""
    state = run_state(config, output_dir)
    return state if isinstance(state, RunResult) else None


def check_jobs(jobs: int) -> None:
    """UserError unless `jobs` (parallel training processes) is a positive integer."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"jobs must be a positive integer, got {jobs!r}")


def _worker_init(threads: int) -> None:
    import torch

    from copra.utils.compat import quiet_known_warnings

    torch.set_num_threads(threads)
    quiet_known_warnings()  # a spawned process starts with no filters: the CLI's do not reach it
    _exit_with_parent()


def _exit_with_parent(poll_seconds: float = 1.0) -> None:
    """End this worker soon after the process that started it dies (even by SIGKILL).

    Why: a killed suite left its workers training on; the suite started again then met their folder
    locks. A worker ended mid-run loses nothing: its run resumes from the last checkpoint.
    """
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="copra-exit-with-parent", daemon=True).start()


def _train_in_worker(config: TrainConfig, output_dir: str, resume: bool) -> str:
    train(config.replace(progress=False), output_dir=output_dir, resume=resume)
    return output_dir


def check_executor(executor: str, ray_address: str | None = None) -> None:
    """UserError unless `executor` is one of EXECUTORS and `ray_address` (if any) a non-empty string."""
    if executor not in EXECUTORS:
        raise UserError(f"executor must be one of {list(EXECUTORS)}, got {executor!r}")
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise UserError(
            f"ray_address must be a non-empty string such as 'auto' or 'ray://host:10001', got {ray_address!r}"
        )


def run_all(
    runs: Sequence[tuple[TrainConfig, str | Path]],
    jobs: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
) -> list[RunResult]:
    """Results of every (config, output folder), in order; finished runs are reused, the rest trained.

    With `jobs` > 1 the missing runs train in that many spawned processes; with `executor="ray"`
    each is a Ray task (`ray_runs`; a private local Ray gets `jobs` CPUs when no address is set).
    Either way their adapters come back through the folders (never pickled), read by `finished`.
    """
    check_jobs(jobs)
    check_executor(executor, ray_address)
    runs = _placed(runs)
    states = [run_state(c, d) for c, d in runs]
    results: list[RunResult | None] = [s if isinstance(s, RunResult) else None for s in states]
    pending: dict[str, int] = {}  # one training per folder: a run asked for twice trains once
    for i, result in enumerate(results):
        if result is None:
            pending.setdefault(str(runs[i][1]), i)
    missing = list(pending.values())
    if executor == "ray" and missing:
        from copra.experiments.runner.ray_tasks import run_on_ray

        run_on_ray(runs, missing, ray_address, jobs)
    elif jobs == 1 or len(missing) <= 1:
        for i in missing:
            results[i] = train(runs[i][0], output_dir=runs[i][1], resume=bool(states[i]))
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(
            max_workers=min(jobs, len(missing)),
            mp_context=get_context("spawn"),
            initializer=_worker_init,
            initargs=(threads,),
        ) as pool:
            futures = [pool.submit(_train_in_worker, runs[i][0], str(runs[i][1]), bool(states[i])) for i in missing]
            for future in futures:
                future.result()  # re-raises a worker's error (a UserError stays one)
    # what other processes trained, and a run asked for twice, come back through its folder
    return [r if r is not None else _reload(*runs[i]) for i, r in enumerate(results)]


def _reload(config: TrainConfig, output_dir: str | Path) -> RunResult:
    """The result a worker (process or Ray task) left in `output_dir`."""
    result = finished(config, output_dir)
    if result is None:
        raise RuntimeError(f"run in {output_dir} finished but left no readable result")
    return result
