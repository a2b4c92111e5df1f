"""How long a suite will take, from a short timing probe, printed before the suite starts (issue 12).

Why: the converged suite trains tens of thousands of optimizer steps; a user should learn before
the first of them whether it fits the afternoon. The probe trains plain LoRA for a few steps with
the suite's own model and settings and measures seconds per optimizer step; every step of the
suite says how many optimizer steps (and at which batch size) it plans; the estimate is their sum
at the probed rate, scaled linearly by batch size. CopRA's steps are counted at LoRA's cost, an
upper bound (gated-off layers are skipped). In a suite whose steps share runs (`runs.shared_runs`)
a run is counted once, in the first step that plans it (`planned_configs`).

Evaluations often cost more than training (a converged suite scores thousands of merged, pruned and
snapshot adapters on whole test splits), so they are estimated too: every step says how many passes
over which evaluation set it makes (`planned_evaluations`, the same loops as the experiments), the
probe times the classifier on a slice of the evaluation set (seconds per example), and a pass costs
that times the set's size. Shapley coalitions are counted as full passes, an upper bound (the
coalition evaluator reuses the frozen prefix), and so is an adapter scored twice (`eval_cache`
scores it once). The estimate is for a fresh folder: stored runs and accuracies are not subtracted.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from copra.adapters.prune import PROJECTIONS
from copra.core.config import TrainConfig
from copra.training.run_folder import snapshot_schedule

PROBE_STEPS = 6  # optimizer steps of the probe (the first is dropped: warm-up)
PROBE_EXAMPLES = 256  # evaluation examples the probe times (after one warm-up batch)
Passes = list[tuple[TrainConfig, int]]  # (a config whose evaluation set is scored, how many times)


@dataclass
class ModelFacts:
    """What the evaluation count needs to know about the model: Shapley players and pruned projections."""

    players: dict[str, int] = field(default_factory=lambda: {"layer": 6, "module": 18})  #: per granularity
    projections: list[str] = field(default_factory=lambda: ["query", "key", "value"])  #: with LoRA modules


def planned_steps(experiment: str, config: Any) -> list[tuple[int, int]]:
    """(batch size, optimizer steps) of every training run a suite step plans (reused runs included)."""
    c = config
    configs = planned_configs(experiment, c)
    if configs is None and experiment in ("merge_map", "merge_protocol"):
        configs = c.planned_runs()  # runs and FL clients, some trained outside `runs.run_all`
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


def run_passes(run: TrainConfig) -> int:
    """Evaluations a training run makes itself: the final adapter, and the early checkpoint if kept."""
    return 1 + int(bool(run.save_early))


def planned_evaluations(experiment: str, config: Any, model: ModelFacts | None = None) -> Passes:
    """Every pass over an evaluation set a suite step makes after training (its runs' own: `run_passes`).

    Counted as the experiment's loops run them: merges and their alphas, pruning schemes and sparsities, Shapley coalitions,
    snapshot curves, FL clients and server per round. An adapter scored twice is counted twice, an
    upper bound: inside a suite `eval_cache` scores it once (a sweep's final merges, pruning's "all" and
    sparsity 0, a landscape's end points, runs two steps share). lr_select's runs score a validation
    split (`validation_examples`), counted here since lr_select trains outside `planned_configs`.
    """
    c, model = config, model or ModelFacts()
    methods = list(getattr(c, "methods", ["lora", "copra"]))
    if experiment == "lr_select":
        return [
            (c.run_config(m, lr, s).replace(eval_examples=c.validation_examples), 1)
            for m in methods
            for lr in c.lr_grid
            for s in c.seeds
        ]
    if experiment == "federated":  # each client's run scores the full evaluation set, then the server's merge
        return [(c.data_config(c.seeds[0]), len(methods) * len(c.seeds) * c.rounds * (c.clients + 1))]
    if experiment == "landscape":
        curves = len(c.merge_methods) + int(c.align)
        return [(c.run_config(methods[0], c.seeds[0]), len(methods) * len(c.pairs()) * (2 + curves * len(c.alphas)))]
    if experiment == "multitask":
        per_task = 1 + len(methods) * len(c.seeds) * 2  # zero-shot; each seed's own and merged adapter
        if c.snapshot_curve:
            per_task += (
                len(methods) * len(c.seeds) * len(snapshot_schedule(c.run_config(c.tasks[0], methods[0], c.seeds[0])))
            )
        return [(c.run_config(t, methods[0], c.seeds[0]), per_task) for t in c.tasks]
    if experiment == "pruning":
        schemes = [s for s in c.schemes if s != "shapley" and (s not in PROJECTIONS or s in model.projections)]
        adapters = len(c.seeds) * (len(methods) + int("copra" in methods))  # + CopRA's early checkpoint
        return [(c.base_config(), adapters * (len(schemes) + len(c.sparsities)))]
    if experiment == "shapley":
        n = model.players[c.granularity]
        coalitions = 2**n if c.estimator == "exact" else min(2**n, c.samples * (n + 1) + 2)
        if c.compare_exact and c.estimator != "exact" and n <= 16:
            coalitions = 2**n  # the exact values too: every coalition
        return [(c.run_config(methods[0], c.seeds[0]), len(methods) * len(c.seeds) * coalitions)]
    if experiment == "sweep":
        return _sweep_passes(c)
    return []


def _sweep_passes(c: Any) -> Passes:
    n = len(c.seeds)
    pairs = len(list(itertools.combinations(range(n), 2)))
    passes = 0
    first = None
    for variant in c.variants:
        for point in c.points():
            run = c.run_config(variant, point, c.seeds[0])
            first = first or run
            passes += pairs  # every seed pair fused
            if c.curve_every:  # at every snapshot and at the end: single, pruned and merged
                passes += (len(snapshot_schedule(run)) + 1) * (n * (1 + len(c.curve_prune)) + pairs)
    return [(first, passes)]


def probe(config: TrainConfig, steps: int = PROBE_STEPS) -> float:
    """Seconds per optimizer step of plain LoRA with `config`'s model and batch size (no output written)."""
    from copra.training.loop import train

    result = train(config.replace(method="lora", steps=steps, progress=False, save_early=False, snapshot_every=0))
    timed = result.step_seconds[1:] or result.step_seconds  # the first step pays for lazy initialisation
    return sum(timed) / len(timed)


def probe_evaluation(config: TrainConfig, examples: int = PROBE_EXAMPLES) -> tuple[float, ModelFacts]:
    """(seconds per evaluation example, the model's facts) of `config`'s classifier, as the experiments score."""
    from copra.adapters.prune import projections
    from copra.core.gates import CopRA
    from copra.experiments.runner.common import BATCH
    from copra.models.evaluation import accuracy, adapter_state, eval_batches
    from copra.training.loop import build_run

    classifier, data = build_run(config.replace(progress=False))
    x, y = data.eval_x[:examples], data.eval_y[:examples]
    batches = list(eval_batches(classifier, x, BATCH))  # collated once, as `common.Evaluator` keeps them
    accuracy(classifier, x[:BATCH], y[:BATCH], BATCH)  # warm-up: lazy initialisation, kernels
    tick = time.perf_counter()
    accuracy(classifier, x, y, BATCH, batches)
    seconds = (time.perf_counter() - tick) / max(1, len(x))
    players = {}
    for granularity in ("layer", "module"):
        gates = CopRA(classifier.encoder, total_steps=1, granularity=granularity)
        players[granularity] = len(gates.players)
        gates.remove()
    return seconds, ModelFacts(players, projections(adapter_state(classifier)))


def evaluation_seconds(passes: dict[str, Passes], seconds_per_example: float) -> dict[str, float]:
    """Expected evaluation seconds per suite step: passes x the set's size x seconds per example."""
    sizes: dict[tuple, int] = {}

    def size(run: TrainConfig) -> int:
        from copra.models.evaluation import prepare_data

        key = (run.task, run.eval_examples, run.model, run.data_root, run.backbone)
        if key not in sizes:
            sizes[key] = len(prepare_data(run).eval_x)
        return sizes[key]

    return {name: sum(count * size(run) * seconds_per_example for run, count in rows) for name, rows in passes.items()}


def estimate(plan: dict[str, list[tuple[int, int]]], seconds_per_step: float, batch_size: int) -> dict[str, float]:
    """Expected training seconds per suite step: steps x seconds per step x (batch / probed batch)."""
    return {
        name: sum(steps * seconds_per_step * batch / batch_size for batch, steps in runs)
        for name, runs in plan.items()
    }


def describe(
    training: dict[str, float],
    seconds_per_step: float,
    batch_size: int,
    evaluation: dict[str, float] | None = None,
    seconds_per_example: float | None = None,
) -> str:
    """One paragraph for the log: the expected wall time, its training and evaluation parts, each step's share."""
    evaluation = evaluation or {}
    both = {name: training.get(name, 0.0) + evaluation.get(name, 0.0) for name in {**training, **evaluation}}
    parts = ", ".join(f"{name} {value / 60:.0f} min" for name, value in both.items())
    train_total, eval_total = sum(training.values()), sum(evaluation.values())
    probed = f"{seconds_per_step:.3f} s per LoRA step at batch {batch_size}"
    if seconds_per_example is not None:
        probed += f", {1000 * seconds_per_example:.1f} ms per evaluation example"
    return (
        f"timing probe: {probed}; expected wall time {(train_total + eval_total) / 3600:.1f} h (training "
        f"{train_total / 3600:.1f} h, evaluation {eval_total / 3600:.1f} h; {parts}); CopRA counted at LoRA's "
        "cost, Shapley coalitions as full passes and a repeated evaluation again (upper bounds); finished runs and "
        "stored accuracies are reused"
    )
