"""How long a suite will take, from a short timing probe, printed before the suite starts (issue 12).

Why: the converged suite trains tens of thousands of optimizer steps; a user should learn before
the first of them whether it fits the afternoon. The probe trains plain LoRA for a few steps with
the suite's own model and settings and measures seconds per optimizer step; every step of the
suite says how many optimizer steps (and at which batch size) it plans; the estimate is their sum
at the probed rate, scaled linearly by batch size. CopRA's steps are counted at LoRA's cost, an
upper bound (gated-off layers are skipped). In a suite whose steps share runs (`runs.shared_runs`)
a run is counted once, in the first step that plans it (`planned_configs`). Evaluations (merges, Shapley coalitions, snapshots)
are not counted: the estimate is the training part, and says so.
"""

from __future__ import annotations

from typing import Any

from copra.config import TrainConfig

PROBE_STEPS = 6  # optimizer steps of the probe (the first is dropped: warm-up)


def planned_steps(experiment: str, config: Any) -> list[tuple[int, int]]:
    """(batch size, optimizer steps) of every training run a suite step plans (reused runs included)."""
    c = config
    configs = planned_configs(experiment, c)
    if configs is not None:
        return [(r.batch_size, r.steps) for r in configs]
    per_method = {
        "federated": lambda: len(c.seeds) * c.clients * c.rounds,
        "lr_select": lambda: len(c.seeds) * len(c.lr_grid),
    }.get(experiment, lambda: len(c.seeds))()
    return [(c.batch_size, c.steps)] * (per_method * len(getattr(c, "methods", ["lora", "copra"])))


def planned_configs(experiment: str, config: Any) -> list | None:
    """Every TrainConfig a suite step trains through `runs.run_all` (None: it trains otherwise, unshared)."""
    c = config
    methods = getattr(c, "methods", ["lora", "copra"])
    if experiment == "sweep":
        return [c.run_config(v, p, s) for v in c.variants for p in c.points() for s in c.seeds]
    if experiment == "multitask":
        return [c.run_config(t, m, s) for s in c.seeds for t in c.tasks for m in methods]
    if experiment in ("landscape", "shapley"):
        return [c.run_config(m, s) for m in methods for s in c.seeds]
    if experiment == "pruning":
        return [c.run_config(m, s) for s in c.seeds for m in ("lora", "copra")]
    return None


def probe(config: TrainConfig, steps: int = PROBE_STEPS) -> float:
    """Seconds per optimizer step of plain LoRA with `config`'s model and batch size (no output written)."""
    from copra.training import train

    result = train(config.replace(method="lora", steps=steps, progress=False, save_early=False, snapshot_every=0))
    timed = result.step_seconds[1:] or result.step_seconds  # the first step pays for lazy initialisation
    return sum(timed) / len(timed)


def estimate(plan: dict[str, list[tuple[int, int]]], seconds_per_step: float, batch_size: int) -> dict[str, float]:
    """Expected training seconds per suite step: steps x seconds per step x (batch / probed batch)."""
    return {name: sum(steps * seconds_per_step * batch / batch_size for batch, steps in runs)
            for name, runs in plan.items()}


def describe(seconds: dict[str, float], seconds_per_step: float, batch_size: int) -> str:
    """One paragraph for the log: the total and each step's share."""
    total = sum(seconds.values())
    parts = ", ".join(f"{name} {value / 60:.0f} min" for name, value in seconds.items())
    return (f"timing probe: {seconds_per_step:.3f} s per LoRA step at batch {batch_size}; expected training time "
            f"{total / 3600:.1f} h ({parts}); evaluations come on top, CopRA counted at LoRA's cost (an upper "
            "bound), finished runs are reused")
