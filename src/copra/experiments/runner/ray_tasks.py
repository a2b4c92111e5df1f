"""Training runs as Ray tasks (`executor="ray"`): the same runs as local processes, on a Ray cluster.

Why Ray: a suite's training runs are independent; past one machine's cores, a Ray cluster spreads
them over many. Each missing run is one Ray task that trains into its own run folder and returns only
that folder's path, exactly as the local worker processes do (`runs.run_all`): the parent reads the
result and adapter back from the folder, so nothing but a config and a path crosses the wire.

Assumptions (documented in docs/scaling.md): every Ray node sees the results folder at the same path (a
shared file system) and has copra installed; a task resumes its run from the newest checkpoint in
its folder, so a task Ray retries after its worker died (SIGKILL, lost node) continues where it
stopped. The address comes from `ray_address`, else `COPRA_RAY_ADDRESS`; with neither, copra starts
a private local Ray (`jobs` CPUs, no dashboard, no usage stats) and shuts it down afterwards. A Ray
the caller already initialised is used as it is and left running.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from copra.core.config import TrainConfig
from copra.utils.errors import UserError

ADDRESS_ENV = "COPRA_RAY_ADDRESS"
MAX_RETRIES = 3  # Ray re-runs a task whose worker died this often; each retry resumes from the checkpoint


def resolve_address(address: str | None) -> str | None:
    """The Ray address to join: the setting, else $COPRA_RAY_ADDRESS, else None (a private local Ray)."""
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise UserError(
            f"ray_address must be a non-empty string such as 'auto' or 'ray://host:10001', got {address!r}"
        )
    return address or os.environ.get(ADDRESS_ENV) or None


@contextmanager
def ray_session(address: str | None, num_cpus: int) -> Iterator[None]:
    """Ray initialised for the block: joins `address`, or starts (and then stops) a small local Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report, before Ray is imported
    try:
        import ray
    except ImportError:
        raise UserError("executor 'ray' needs the ray package (pip install 'ray>=2.9')") from None
    if ray.is_initialized():
        yield
        return
    address = resolve_address(address)
    try:
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UserError(f"cannot start or join Ray at {address or 'a local instance'}: {error}") from None
    try:
        yield
    finally:
        ray.shutdown()


def train_task(config: TrainConfig, output_dir: str) -> str:
    """One run in a Ray worker: resume from its folder's checkpoint if any, train, return the folder.

    torch gets as many threads as the task holds CPUs (Ray's OMP_NUM_THREADS does not reach a torch
    imported earlier), so workers neither oversubscribe a node nor differ from each other in bits.
    """
    import ray
    import torch

    from copra.experiments.runner.state import run_state
    from copra.training.loop import train
    from copra.utils.compat import quiet_known_warnings

    quiet_known_warnings()  # a Ray worker is a fresh process: the driver's warning filters do not reach it
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    resume = bool(run_state(config, output_dir))  # decided here, so a retried task resumes too
    train(config.replace(progress=False), output_dir=output_dir, resume=resume)
    return output_dir


def run_on_ray(
    runs: Sequence[tuple[TrainConfig, str | Path]], missing: Sequence[int], address: str | None, num_cpus: int
) -> None:
    """Train runs[i] for every i in `missing` as Ray tasks (one CPU each); returns when all finished.

    A task's UserError comes back as the same one-line UserError; other failures propagate.
    """
    with ray_session(address, num_cpus):
        import ray

        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(train_task)
        pending = {task.remote(runs[i][0], str(Path(runs[i][1]).resolve())): i for i in missing}
        bar = tqdm(total=len(pending), desc="ray runs", leave=False, disable=not runs[missing[0]][0].progress)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                pending.pop(ready[0])
                _get(ray, ready[0])
                bar.update(1)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            bar.close()


def _get(ray, ref) -> str:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, UserError):
            raise UserError(str(error.cause)) from None
        raise
