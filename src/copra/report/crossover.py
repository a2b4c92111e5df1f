"""The crossover figure (issue 12): CopRA minus LoRA, with confidence intervals, against training length.

It answers "from what training length does CopRA pay, if at all?". Read from sweeps run with
`curve_every` (the converged suite's `crossover` step): their snapshots give, at each step, the
accuracy of every seed's adapter and of every fused seed pair. At each step the variant named
"CopRA" is compared with the one named "LoRA" (where a sweep has no such names, the CopRA setting
with the best final merged accuracy with the best LoRA setting) through `copra.analysis.stats.compare`:
merged accuracy over disjoint seed pairs, single (and, with `curve_prune`, pruned) accuracy over
seeds. A snapshot at step t is the
adapter t steps into a run of the sweep's full length (its lr schedule and CopRA ramp scaled to
that length), not a run that was t steps long. A multitask step run with `snapshot_curve` adds
the same comparison for its merged task adapters (each seed's adapters of all tasks fused).
"""

from __future__ import annotations

import base64
import io
import itertools
from pathlib import Path

from copra.analysis.stats import Comparison, compare, disjoint_pairs

CONFIDENCE = 0.95


def _best(rows: list[dict], prefix: str) -> dict | None:
    """The variant named exactly `prefix` (no choice made on test scores), else the best one starting with it."""
    mine = [r for r in rows if str(r.get("variant", "")).startswith(prefix) and isinstance(r.get("curve"), dict)]
    exact = [r for r in mine if r.get("variant") == prefix]
    return exact[0] if exact else max(mine, key=lambda r: r.get("merged_mean", 0.0)) if mine else None


def curves(summary: dict) -> dict | None:
    """{"steps", "merged", "single", "pruned", "names"} of CopRA − LoRA per step; None without per-seed curves.

    A multitask summary with a `snapshot_curve` gives its merged (tasks fused per seed) accuracy only.
    """
    if summary.get("experiment") == "multitask":
        return _multitask_curves(summary)
    rows = [r for r in summary.get("points") or [] if isinstance(r, dict)]
    copra, lora = _best(rows, "CopRA"), _best(rows, "LoRA")
    if copra is None or lora is None or not copra["curve"].get("merged") or not lora["curve"].get("merged"):
        return None
    seeds = len((summary.get("config") or {}).get("seeds") or [])
    keep = disjoint_pairs(list(itertools.combinations(range(seeds), 2)))
    c, lo = copra["curve"], lora["curve"]
    schemes = [k for k in c.get("pruned") or {} if k in (lo.get("pruned") or {})]
    out = {
        "steps": [],
        "merged": [],
        "single": [],
        "pruned": {k: [] for k in schemes},
        "names": (copra["variant"], lora["variant"]),
    }
    try:
        for step in (k for k in c["steps"] if k in lo["steps"]):
            i, j = c["steps"].index(step), lo["steps"].index(step)
            if not keep or {len(c["merged"][i]), len(lo["merged"][j])} != {seeds * (seeds - 1) // 2}:
                return None  # the pairs do not match the seeds: nothing to pair
            out["merged"].append(
                compare([c["merged"][i][k] for k in keep], [lo["merged"][j][k] for k in keep], CONFIDENCE)
            )
            out["single"].append(compare(c["single"][i], lo["single"][j], CONFIDENCE))
            for scheme in schemes:
                out["pruned"][scheme].append(compare(c["pruned"][scheme][i], lo["pruned"][scheme][j], CONFIDENCE))
            out["steps"].append(step)
    except (KeyError, IndexError, TypeError, ValueError):
        return None  # an incomplete or older curve
    return out if out["steps"] else None


def _multitask_curves(summary: dict) -> dict | None:
    curve = summary.get("curve") or {}
    try:
        copra, lora = curve["merged"]["copra"], curve["merged"]["lora"]
        steps = list(curve["steps"])
        if not steps or len(copra) != len(steps) or len(lora) != len(steps):
            return None
        merged = [compare(c, lo, CONFIDENCE) for c, lo in zip(copra, lora)]
    except (KeyError, TypeError, ValueError):
        return None  # no curve, or one method missing
    return {
        "steps": steps,
        "merged": merged,
        "single": [],
        "pruned": {},
        "names": ("CopRA", "LoRA"),
        "merged_label": "merged (task adapters fused per seed, mean over tasks)",
    }


def _cell(c: Comparison) -> str:
    ci = "no interval" if c.low is None else f"[{100 * c.low:+.1f}, {100 * c.high:+.1f}]"
    return f"{100 * c.difference:+.1f} {ci}, {c.verdict}"


def _columns(data: dict) -> list[tuple[str, list[Comparison]]]:
    """(heading, comparison per step) of every measured quantity: merged, single, then each pruning scheme."""
    columns = [(data.get("merged_label", "merged (fused seed pairs)"), data["merged"])]
    if data.get("single"):
        columns.append(("single adapters", data["single"]))
    return columns + [(f"pruned ({scheme})", values) for scheme, values in (data.get("pruned") or {}).items()]


def table(data: dict) -> str:
    columns = _columns(data)
    lines = [
        "| step | " + " | ".join(f"{name}: CopRA − LoRA, 95% CI" for name, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    lines += [
        f"| {step} | " + " | ".join(_cell(values[n]) for _, values in columns) + " |"
        for n, step in enumerate(data["steps"])
    ]
    return "\n".join(lines)


def summary_line(data: dict) -> str:
    """Plain words: from which step CopRA's merged accuracy is shown to be higher, or where it comes closest;
    then the same for each pruning scheme scored."""
    return _merged_line(data) + _pruned_line(data)


def _merged_line(data: dict) -> str:
    steps = data["steps"]
    held = [s for s, m in zip(steps, data["merged"]) if m.verdict == "held"]
    if held and held == steps[steps.index(held[0]) :]:
        return (
            f"CopRA's merged accuracy is shown higher than LoRA's from step {held[0]} on ({len(held)} of "
            f"{len(steps)} steps)."
        )
    if held:
        return (
            f"CopRA's merged accuracy is shown higher than LoRA's at steps {', '.join(map(str, held))} only "
            f"({len(held)} of {len(steps)} steps)."
        )
    closest = max(zip(data["steps"], data["merged"]), key=lambda x: x[1].difference)
    return (
        f"CopRA's merged accuracy is not shown higher than LoRA's at any length here; it comes closest at step "
        f"{closest[0]} ({100 * closest[1].difference:+.1f} points)."
    )


def _pruned_line(data: dict) -> str:
    lines = []
    for scheme, values in (data.get("pruned") or {}).items():
        held = [s for s, c in zip(data["steps"], values) if c.verdict == "held"]
        reversed_ = [s for s, c in zip(data["steps"], values) if c.verdict == "reversed"]
        words = f"shown higher at steps {', '.join(map(str, held))}" if held else "not shown higher at any step"
        if reversed_:
            words += f", lower at steps {', '.join(map(str, reversed_))}"
        lines.append(f" Pruned ({scheme}): CopRA {words}.")
    return "".join(lines)


def png(data: dict) -> bytes:
    """The figure: differences (points) with CI bars against the step, one line per column of `table`, a zero line."""
    from copra.experiments.runner.common import new_axes

    figure, ax = new_axes(7.0, 3.8)
    columns = _columns(data)
    for n, (label, values) in enumerate(columns):
        offset = 0.02 * (n - (len(columns) - 1) / 2)  # side by side, so the CI bars do not hide each other
        xs = [s * (1 + offset) for s in data["steps"]]
        ys = [100 * c.difference for c in values]
        low = [0 if c.low is None else 100 * (c.difference - c.low) for c in values]
        high = [0 if c.high is None else 100 * (c.high - c.difference) for c in values]
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("training step (snapshots of the same runs)")
    ax.set_ylabel("CopRA − LoRA (accuracy points)")
    ax.set_title(f"{data['names'][0]} − {data['names'][1]}, 95% CI", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def figures(summaries: list[tuple[Path, dict]]) -> dict[str, tuple[Path, dict, dict, bytes]]:
    """{report file name: (summary path, summary, CopRA − LoRA per step, PNG)} for sweeps with per-seed curves
    (only sweeps named "crossover..." where there are any: the converged suite's other curve sweeps share their runs)
    and multitask summaries with a snapshot curve."""
    sweeps = [(path, summary) for path, summary in summaries if summary.get("experiment", "sweep") == "sweep"]
    named = [(path, summary) for path, summary in sweeps if str(summary.get("name", "")).startswith("crossover")]
    chosen = (named or sweeps) + [
        (path, summary) for path, summary in summaries if summary.get("experiment") == "multitask"
    ]
    found = [(path, summary, data) for path, summary in chosen if (data := curves(summary))]
    return {
        f"paper_report_crossover{'' if n == 0 else f'-{n}'}.png": (path, summary, data, png(data))
        for n, (path, summary, data) in enumerate(found)
    }


def sections(found: dict[str, tuple[Path, dict, dict, bytes]], root: Path, embed: dict[str, str] | None) -> list[str]:
    """The report's first section: the figure(s) and tables; with `embed` (HTML) the PNGs go in as data URIs."""
    parts = []
    for name, (path, summary, data, image) in found.items():
        ref = name
        if embed is not None:
            ref = f"copra-image-{len(embed)}"
            embed[ref] = "data:image/png;base64," + base64.b64encode(image).decode("ascii")
        what = "multitask" if summary.get("experiment") == "multitask" else summary.get("name", "sweep")
        task = ", ".join(summary["tasks"]) if isinstance(summary.get("tasks"), list) else summary.get("task")
        parts += [
            f"*{what} on {task}, from {path.relative_to(root).as_posix()}. {summary_line(data)}*",
            "",
            f"![crossover]({ref})",
            "",
            table(data),
            "",
        ]
    if not parts:
        return []
    return [
        '<a id="crossover"></a>',
        "",
        "## Crossover: from what training length does CopRA pay?",
        "",
        "CopRA minus LoRA (accuracy points) at each snapshot step of the same runs, with 95% paired "
        "t-intervals: merged = fused disjoint seed pairs (multitask: each seed's task adapters fused), single = "
        "each seed's adapter, pruned = each seed's adapter structurally pruned (where the sweep scored it).",
        "",
        *parts,
    ]
