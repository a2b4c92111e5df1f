"""Which training runs under a results folder converged: the report's convergence section.

Every finished run writes `result.json` with `converged` (the plateau test of `copra.analysis.stats.plateau`
on its training loss) and the test's statistic. The paper trains far longer than quick runs here,
and a comparison of undertrained adapters says nothing about the method, so the report lists every
run that did not converge by name instead of hiding it. Runs written before the test existed, and
runs too short to judge, count as "not tested".
"""

from __future__ import annotations

import json
from pathlib import Path

SHOWN = 20  # runs listed by name per kind; the rest are counted


def scan(root: str | Path) -> list[dict]:
    """One row per `result.json` under `root`: where, method, task, seed, steps, converged, statistic."""
    from copra.training.run_folder import RESULT_FILE

    root = Path(root)
    rows = []
    for path in sorted(root.rglob(RESULT_FILE)):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # half-written or unreadable: the run is not finished
        if not isinstance(data, dict):
            continue
        config = data.get("config") if isinstance(data.get("config"), dict) else {}
        statistic = data.get("plateau") if isinstance(data.get("plateau"), dict) else {}
        rows.append(
            {
                "run": path.parent.relative_to(root).as_posix(),
                "method": config.get("method"),
                "task": config.get("task"),
                "seed": config.get("seed"),
                "steps": config.get("steps"),
                "converged": data.get("converged"),
                "improvement": statistic.get("improvement"),
                "final_loss": data.get("final_loss"),
            }
        )
    return rows + _federated_clients(root)


def _federated_clients(root: Path) -> list[dict]:
    """Federated clients train in memory (no result.json): their plateau tests live in federated.json."""
    rows = []
    for path in sorted(root.rglob("federated.json")):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            for method, runs in summary["runs"].items():
                for run in runs:
                    for r in run["rounds"]:
                        for i, converged in enumerate(r.get("client_converged") or []):
                            rows.append(
                                {
                                    "run": f"{path.relative_to(root).as_posix()}: seed {run['seed']} round "
                                    f"{r['round']} client {i}",
                                    "method": method,
                                    "task": summary.get("task"),
                                    "seed": run["seed"],
                                    "steps": summary["config"]["steps"],
                                    "converged": converged,
                                    "improvement": None,
                                    "final_loss": r["client_final_loss"][i],
                                }
                            )
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            continue  # an older or partial summary: its clients were not tested
    return rows


def _cell(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def section(rows: list[dict]) -> str | None:
    """Markdown: counts per method, then the runs that did not converge (and those not tested)."""
    if not rows:
        return None
    methods = sorted({str(r["method"]) for r in rows})
    status = lambda r: (
        "converged" if r["converged"] is True else "did not converge" if r["converged"] is False else "not tested"
    )  # noqa: E731
    counts = ["| method | runs | converged | did not converge | not tested |", "|---|---|---|---|---|"]
    for method in methods:
        mine = [status(r) for r in rows if str(r["method"]) == method]
        counts.append(
            f"| {method} | {len(mine)} | {mine.count('converged')} | {mine.count('did not converge')} | "
            f"{mine.count('not tested')} |"
        )
    lines = [
        "Plateau test (`copra.analysis.stats.plateau`): the mean training loss of the last tenth of a run (at least 5 "
        "steps) improved on the tenth before it by less than 2% (or is at most 0.05). A cosine schedule "
        "flattens any curve near its end, so *converged* means no more progress at this length.",
        "",
        *counts,
        "",
    ]
    for kind in ("did not converge", "not tested"):
        listed = [r for r in rows if status(r) == kind]
        if listed:
            lines += [
                f"Runs that {'did not converge' if kind == 'did not converge' else 'were not tested'} "
                f"({len(listed)}):",
                "",
                "| run | method | task | seed | steps | improvement | final loss |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['run']} | {r['method']} | {r['task']} | {r['seed']} | {r['steps']} | "
                f"{_cell(r['improvement'])} | {_cell(r['final_loss'])} |"
                for r in listed[:SHOWN]
            ]
            lines += ([f"| … and {len(listed) - SHOWN} more | | | | | | |"] if len(listed) > SHOWN else []) + [""]
    return "\n".join(lines)
