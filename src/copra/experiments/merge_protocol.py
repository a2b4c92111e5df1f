"""The merge protocol (issue 23): does CopRA merge and prune better than LoRA, asked where LoRA's merges break.

Four primary endpoints, fixed before any result exists (`preregistration.register` writes their spec and
its sha256 into the output folder; a changed spec is refused once results exist), each CopRA minus LoRA
at the final step, on the test split, in accuracy points:

- `seed_fusion`: fusion at 1/2 of disjoint seed pairs (0, 1), (2, 3), ... (one row per pair);
- `fl_one_shot`: `clients` clients share the seed's init, each trains on its IID share of the seed's
  few-shot sample, and the server fuses them once at 1/clients (one row per seed);
- `mtl_retention`: one adapter per task (the seed's), fused at 1/T and scaled by the lambda of
  `mtl_scales` that is best on the tasks' validation sets; per task merged / own accuracy, averaged
  over tasks (one row per seed; tasks are not pooled, they are the endpoint);
- `prune_every_other`: every other block's adapter removed (one row per seed).

Statistics per task: the paired t over rows (`copra.stats.compare`), the two-level bootstrap over rows
and test examples (`analysis.protocol.bootstrap_paired`; per-example outcomes are stored). Pooled over
tasks: DerSimonian-Laird random effects. Each endpoint's p-value is the exact sign-flip test over every
row of every task; Holm's correction runs across the four, and an endpoint is *held* (or *reversed*)
only when its adjusted p is below `alpha`. Everything else is exploratory.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from copra.adapters.io import load_adapter
from copra.adapters.merge import fusion, scale_update
from copra.adapters.prune import structured
from copra.analysis.protocol import bootstrap_paired, holm, random_effects, sign_flip_test
from copra.analysis.stats import HELD, NO_DIFFERENCE, REVERSED, Comparison, compare
from copra.core.config import TrainConfig, make_config
from copra.data.fewshot import prepare_data, prepare_shared_validation
from copra.experiments.runner import preregistration
from copra.experiments.runner.clients import client_configs, one_shot_fl
from copra.experiments.runner.common import (
    Evaluator,
    RunExecution,
    TrainingBudget,
    budget_config,
    check_overrides,
    check_unique,
    new_axes,
    save_figure,
    write_outputs,
)
from copra.experiments.runner.diagnostics import outcome
from copra.experiments.runner.runs import run_all
from copra.utils.errors import UserError

ENDPOINTS = ("seed_fusion", "fl_one_shot", "mtl_retention", "prune_every_other")
METHODS = ("lora", "copra")  # control, treatment


@dataclass
class MergeProtocolConfig(TrainingBudget, RunExecution):
    """The pre-registered comparison of CopRA and LoRA adapters after merging and pruning."""

    name: str = "merge_protocol"  #: output file stem
    tasks: list[str] = field(default_factory=lambda: ["covid_intents", "hwu64", "banking77"])  #: >= 2 (MTL)
    seeds: list[int] = field(default_factory=lambda: list(range(10)))  #: an even number: disjoint pairs
    cell: dict[str, Any] = field(default_factory=dict)  #: TrainConfig settings of the map's kept cell
    endpoints: list[str] = field(default_factory=lambda: list(ENDPOINTS))  #: primary endpoints, in order
    clients: int = 5  #: FL clients per seed (IID shares of the seed's few-shot sample)
    client_steps: int | None = None  #: optimizer steps per client (default: steps / clients, at least 1)
    mtl_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])  #: lambda grid (validation)
    #: exploratory mechanism arms: name -> TrainConfig overrides (`steps_scale` scales the run's steps), each scored
    #: on seed_fusion, fl_one_shot and prune_every_other against LoRA and against CopRA (see CONTROLS)
    controls: dict[str, dict[str, Any]] = field(default_factory=dict)
    fl_distinct_inits: bool = False  #: exploratory: also the FL merge of clients that do not share the init
    validation_examples: int = 400  #: per task, for the MTL lambda
    alpha: float = 0.05  #: family-wise error of the primary endpoints (Holm)
    confidence: float = 0.95  #: intervals
    resamples: int = 10_000  #: bootstrap resamples
    shots: int = 8  #: training examples per class
    steps: int = 500  #: optimizer steps per run
    lr: float = 5e-4  #: peak lr (the cell may set its own)
    eval_examples: int = 2000  #: test examples per task (capped by the split)
    output_dir: str = "results/merge_protocol"  #: where runs, JSON, PNG and Markdown go

    def __post_init__(self) -> None:
        check_unique("tasks", self.tasks, minimum=2)
        check_unique("seeds", self.seeds, minimum=4)
        if len(self.seeds) % 2:
            raise UserError(f"seeds must be an even number (disjoint pairs), got {len(self.seeds)}")
        check_unique("endpoints", self.endpoints, ENDPOINTS)
        check_overrides(self.overrides)
        check_overrides(self.cell)
        if isinstance(self.clients, bool) or not isinstance(self.clients, int) or self.clients < 2:
            raise UserError(f"clients must be an integer >= 2, got {self.clients!r}")
        if self.client_steps is not None and (not isinstance(self.client_steps, int) or self.client_steps < 1):
            raise UserError(f"client_steps must be a positive integer, got {self.client_steps!r}")
        check_unique("mtl_scales", self.mtl_scales)
        if not all(isinstance(s, (int, float)) and s > 0 for s in self.mtl_scales):
            raise UserError(f"mtl_scales must be positive numbers, got {self.mtl_scales!r}")
        for name in ("alpha", "confidence"):
            if not isinstance(getattr(self, name), float) or not 0 < getattr(self, name) < 1:
                raise UserError(f"{name} must be a number in (0, 1), got {getattr(self, name)!r}")
        if not isinstance(self.controls, dict) or any(k in METHODS for k in self.controls):
            raise UserError(f"controls must map new arm names to TrainConfig overrides, got {self.controls!r}")
        for name, overrides in self.controls.items():
            check_overrides(
                {k: v for k, v in overrides.items() if k != "method"} if isinstance(overrides, dict) else overrides
            )
        if not isinstance(self.fl_distinct_inits, bool):
            raise UserError(f"fl_distinct_inits must be true or false, got {self.fl_distinct_inits!r}")
        for task in self.tasks:
            for arm in self.arms():
                self.run_config(task, arm, self.seeds[0])  # validates every run

    def arms(self) -> list[str]:
        return [*METHODS, *self.controls]

    def run_config(self, task: str, arm: str, seed: int) -> TrainConfig:
        """One run: LoRA or CopRA, or a control arm's overrides, at the cell."""
        extra = dict(self.controls.get(arm, {"method": arm}))
        scale = extra.pop("steps_scale", None)
        config = budget_config(self, task=task, method=extra.pop("method", "lora"), seed=seed)
        config = make_config({**config.to_dict(), **self.cell, **extra, "progress": False})
        if scale is not None:
            if not isinstance(scale, (int, float)) or not 0 < scale <= 1:
                raise UserError(f"control {arm!r}: steps_scale must be in (0, 1], got {scale!r}")
            config = config.replace(steps=max(1, round(config.steps * scale)))
        return config

    def planned_runs(self) -> list[TrainConfig]:
        """Every run this protocol trains: each arm's seeds, and their FL clients (`report.timing` counts them)."""
        out = []
        for task in self.tasks:
            for arm in self.arms():
                for seed in self.seeds:
                    run = self.run_config(task, arm, seed)
                    out.append(run)
                    if "fl_one_shot" in self.endpoints:
                        out += client_configs(run, self.clients, self.client_steps)
                    if self.fl_distinct_inits and arm in METHODS:
                        out += client_configs(run, self.clients, self.client_steps, distinct_inits=True)
        return out

    def spec(self) -> dict[str, Any]:
        """What is pre-registered: everything that decides the primary answer (not how runs execute)."""
        decided = {k: v for k, v in asdict(self).items() if k not in ("output_dir", "progress", "jobs", "executor")}
        decided.pop("ray_address", None)
        return {"protocol": "merge_protocol/1", "correction": "holm", "test": "sign_flip", **decided}


def run(config: MergeProtocolConfig) -> dict:
    """Register the spec, train every run, score the four endpoints, then the statistics."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    spec = config.spec()
    digest = preregistration.register(out, spec)
    plan = [(t, m, s) for t in config.tasks for m in config.arms() for s in config.seeds]
    runs = [(config.run_config(t, m, s), out / "runs" / t / m / f"seed{s}") for t, m, s in plan]
    adapters = {
        key: load_adapter(r.adapter_dir)
        for key, r in zip(plan, run_all(runs, config.jobs, config.executor, config.ray_address))
    }
    rows: dict[str, dict[str, dict[str, list[dict]]]] = {e: {} for e in config.endpoints}
    planned = dict(zip(plan, runs))
    evaluators, tests = {}, {}
    for task in config.tasks:
        first = config.run_config(task, "lora", config.seeds[0])
        ev, data = evaluators[task], tests[task] = Evaluator(first), prepare_data(first)
        for method in config.arms():
            mine = [adapters[task, method, s] for s in config.seeds]
            got = {}
            if "seed_fusion" in rows:
                got["seed_fusion"] = [
                    outcome(ev.scored(fusion([mine[i][0], mine[i + 1][0]], [0.5, 0.5]), mine[i][1], data))
                    for i in range(0, len(mine), 2)
                ]
            if "prune_every_other" in rows:
                got["prune_every_other"] = [outcome(ev.scored(structured(s, "every_other"), c, data)) for s, c in mine]

            def fl(distinct_inits: bool) -> list[dict]:
                """Each seed's one-shot FL merge: `clients` IID clients in the seed's run folder."""
                merged = [
                    one_shot_fl(
                        *planned[task, method, s],
                        config.clients,
                        steps=config.client_steps,
                        distinct_inits=distinct_inits,
                    )
                    for s in config.seeds
                ]
                return [outcome(ev.scored(state, mine[0][1], data)) for state in merged]

            if config.fl_distinct_inits and method in METHODS:
                got["fl_distinct_inits"] = fl(True)
            if "fl_one_shot" in rows:
                got["fl_one_shot"] = fl(False)
            got["single"] = [outcome(ev.scored(s, c, data)) for s, c in mine]
            for endpoint, values in got.items():
                rows.setdefault(endpoint, {}).setdefault(task, {})[method] = values
    if "mtl_retention" in rows:
        rows["mtl_retention"] = mtl_rows(config, adapters, evaluators, tests, rows["single"])
    summary: dict[str, Any] = {
        "experiment": "merge_protocol",
        "name": config.name,
        "config": asdict(config),
        "preregistration": {"sha256": digest, **preregistration.check(out, spec)},
        "rows": rows,
    }
    summary["analysis"] = analyse(rows, config)
    summary["exploratory"] = exploratory(rows, config)
    summary["wall_seconds"] = time.perf_counter() - started
    write_outputs(out, config.name, summary, plot, render)
    return summary


def mtl_rows(config, adapters, evaluators, tests, single) -> dict[str, dict[str, list[dict]]]:
    """Per seed and method: the tasks' adapters fused at 1/T, lambda picked on validation, retention per task."""
    validation = {
        t: prepare_shared_validation(
            [config.run_config(t, "lora", s) for s in config.seeds], config.validation_examples
        )
        for t in config.tasks
    }
    out: dict[str, dict[str, list[dict]]] = {"all": {m: [] for m in METHODS}}
    for method in METHODS:
        for index, seed in enumerate(config.seeds):
            states = [adapters[t, method, seed][0] for t in config.tasks]
            merged = fusion(states, [1 / len(states)] * len(states))
            cfg = adapters[config.tasks[0], method, seed][1]

            def validated(scale: float) -> float:
                state = scale_update(merged, scale)
                return statistics.fmean(evaluators[t].scored(state, cfg, validation[t]).accuracy for t in config.tasks)

            scale = max(config.mtl_scales, key=validated)
            state = scale_update(merged, scale)
            per_task = {}
            for t in config.tasks:
                own = single[t][method][index]["accuracy"]
                per_task[t] = evaluators[t].scored(state, cfg, tests[t]).accuracy / own if own > 0 else 0.0
            out["all"][method].append(
                {"accuracy": statistics.fmean(per_task.values()), "scale": scale, "per_task": per_task}
            )
    return out


def paired(by_arm: dict, treatment: str, control: str, confidence: float = 0.95) -> tuple[list[float], Comparison]:
    """Per-row differences treatment - control in points, and their paired t-interval over the rows."""
    a, b = by_arm[control], by_arm[treatment]
    d = [100 * (y["accuracy"] - x["accuracy"]) for x, y in zip(a, b)]
    return d, compare([100 * r["accuracy"] for r in b], [100 * r["accuracy"] for r in a], confidence)


def analyse(rows: dict, config: MergeProtocolConfig) -> dict[str, Any]:
    """Per task (t and bootstrap), pooled (random effects), the sign-flip p per endpoint and Holm across them."""
    result: dict[str, Any] = {"endpoints": {}}
    for endpoint in config.endpoints:
        per_task, differences = {}, []
        for task, by_method in rows[endpoint].items():
            control, treatment = by_method["lora"], by_method["copra"]
            d, t = paired(by_method, "copra", "lora", config.confidence)
            differences += d
            entry = {"difference": t.difference, "t_low": t.low, "t_high": t.high, "n": t.n, "sd": t.sd}
            if all("correct" in r for r in control + treatment):
                boot = bootstrap_paired(
                    [[100.0 * (c == "1") for c in r["correct"]] for r in treatment],
                    [[100.0 * (c == "1") for c in r["correct"]] for r in control],
                    config.confidence,
                    config.resamples,
                )
                entry |= {"boot_low": boot.low, "boot_high": boot.high, "boot_se": boot.se}
            per_task[task] = entry
        pooled = None
        ses = [e["sd"] / e["n"] ** 0.5 if e["sd"] else None for e in per_task.values()]
        if len(per_task) > 1 and all(se for se in ses):
            fit = random_effects([e["difference"] for e in per_task.values()], ses, config.confidence)
            pooled = {"difference": fit.pooled, "low": fit.low, "high": fit.high, "tau2": fit.tau2, "i2": fit.i2}
        result["endpoints"][endpoint] = {
            "tasks": per_task,
            "pooled": pooled,
            "mean_difference": statistics.fmean(differences),
            "p": sign_flip_test(differences),
            "rows": len(differences),
        }
    adjusted = holm([e["p"] for e in result["endpoints"].values()])
    for e, p in zip(result["endpoints"].values(), adjusted):
        e["p_holm"] = p
        e["verdict"] = (HELD if e["mean_difference"] > 0 else REVERSED) if p < config.alpha else NO_DIFFERENCE
    return result


CONTROLS = {
    # CopRA's mean keep rate under p(t) = min(4t/3T, 1) is 3/4 * 1/2 + 1/4 = 0.625: the same expected number of
    # adapter-steps with a constant p. Does the ramp matter, or only dropping layers?
    "constant p=0.625": {"method": "copra", "initial_p": 0.625, "final_p": 0.625},
    # LoRA with as many adapter-steps as CopRA takes: does CopRA merge better only because it trains less?
    "LoRA, 5/8 of the steps": {"method": "lora", "steps_scale": 0.625},
}


def exploratory(rows: dict, config: MergeProtocolConfig) -> list[dict[str, Any]]:
    """Every comparison outside the primary four: each control against LoRA and against CopRA, and CopRA against
    LoRA for FL clients with their own inits. Paired t per task and the sign-flip p over all rows, unadjusted."""
    pairs = [(arm, "lora") for arm in config.controls] + [("copra", arm) for arm in config.controls]
    asked = [(e, t, c) for t, c in pairs for e in ("seed_fusion", "fl_one_shot", "prune_every_other") if e in rows]
    if "fl_distinct_inits" in rows:
        asked.append(("fl_distinct_inits", "copra", "lora"))
    out = []
    for endpoint, treatment, control in asked:
        per_task = {task: paired(by, treatment, control) for task, by in rows[endpoint].items()}
        d = [x for differences, _ in per_task.values() for x in differences]
        out.append(
            {
                "endpoint": endpoint,
                "treatment": treatment,
                "control": control,
                "difference": statistics.fmean(d),
                "p": sign_flip_test(d),
                "tasks": {
                    t: {"difference": c.difference, "low": c.low, "high": c.high} for t, (_, c) in per_task.items()
                },
            }
        )
    return out


# ----------------------------------------------------------------------------- outputs
def plot(summary: dict, path: str | Path) -> Path:
    """Per endpoint: each task's difference with its bootstrap (else t) interval, and the pooled one."""
    figure, ax = new_axes(
        7.5, 0.6 + 0.45 * sum(len(e["tasks"]) + 1 for e in summary["analysis"]["endpoints"].values())
    )
    y, labels = 0, []
    for i, (endpoint, e) in enumerate(summary["analysis"]["endpoints"].items()):
        for task, entry in list(e["tasks"].items()) + ([("pooled", e["pooled"])] if e["pooled"] else []):
            low = entry.get("boot_low", entry.get("t_low", entry.get("low")))
            high = entry.get("boot_high", entry.get("t_high", entry.get("high")))
            if low is not None:
                ax.plot([low, high], [y, y], color=f"C{i}")
            ax.plot([entry["difference"]], [y], "o" if task != "pooled" else "D", color=f"C{i}")
            labels.append(f"{endpoint}: {task}")
            y += 1
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("CopRA - LoRA (accuracy points; MTL: retention x 100)")
    return save_figure(figure, path)


def render(summary: dict) -> str:
    c, analysis = summary["config"], summary["analysis"]
    reg = summary["preregistration"]
    lines = [
        f"### Merge protocol `{summary['name']}`: CopRA - LoRA, pre-registered endpoints",
        "",
        f"Tasks {', '.join(c['tasks'])}; seeds {c['seeds']}; cell {json.dumps(c['cell'])}; {c['shots']} shots, "
        f"{c['steps']} steps, lr {c['lr']:g}; test split (up to {c['eval_examples']} examples). Pre-registration "
        f"sha256 `{reg['sha256'][:16]}`"
        + ("" if reg.get("matches", True) else " **(changed since registration)**")
        + f". Holm across {len(analysis['endpoints'])} endpoints, exact sign-flip p over all rows, alpha {c['alpha']}.",
        "",
        "| endpoint | task | CopRA - LoRA | 95% CI (t) | 95% CI (bootstrap) | p (sign flip) | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ci(low, high) -> str:
        return "—" if low is None else f"{low:+.2f} to {high:+.2f}"

    for endpoint, e in analysis["endpoints"].items():
        for task, t in e["tasks"].items():
            lines.append(
                f"| {endpoint} | {task} | {t['difference']:+.2f} | {ci(t['t_low'], t['t_high'])} | "
                f"{ci(t.get('boot_low'), t.get('boot_high'))} | | | |"
            )
        pooled = e["pooled"]
        lines.append(
            f"| **{endpoint}** | pooled | {(pooled or {'difference': e['mean_difference']})['difference']:+.2f} | "
            f"{ci(pooled['low'], pooled['high']) if pooled else '—'} (random effects) | | {e['p']:.4f} | "
            f"{e['p_holm']:.4f} | **{e['verdict']}** |"
        )
    if summary.get("exploratory"):
        lines += [
            "",
            "Exploratory (no correction; not part of the answer): treatment - control, all rows, sign-flip p.",
            "",
            "| endpoint | treatment | control | difference | p |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {x['endpoint']} | {x['treatment']} | {x['control']} | {x['difference']:+.2f} | {x['p']:.4f} |"
            for x in summary["exploratory"]
        ]
    lines += ["", f"![{summary['name']}]({summary['name']}.png)", ""]
    return "\n".join(lines)
