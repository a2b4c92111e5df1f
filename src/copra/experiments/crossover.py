"""The crossover figure (issue 12): CopRA minus LoRA, with confidence intervals, against training length.

It answers "from what training length does CopRA pay, if at all?". Read from sweeps run with
`curve_every` (the converged suite's `crossover` step): their snapshots give, at each step, the
accuracy of every seed's adapter and of every fused seed pair. At each step the variant named
"CopRA" is compared with the one named "LoRA" (where a sweep has no such names, the CopRA setting
with the best final merged accuracy with the best LoRA setting) through `copra.stats.compare`:
merged accuracy over disjoint seed pairs, single accuracy over seeds. A snapshot at step t is the
adapter t steps into a run of the sweep's full length (its lr schedule and CopRA ramp scaled to
that length), not a run that was t steps long.
"""

from __future__ import annotations

import base64
import io
import itertools
from pathlib import Path

from copra.stats import Comparison, compare, disjoint_pairs

CONFIDENCE = 0.95


def _best(rows: list[dict], prefix: str) -> dict | None:
    """The variant named exactly `prefix` (no choice made on test scores), else the best one starting with it."""
    mine = [r for r in rows if str(r.get("variant", "")).startswith(prefix) and isinstance(r.get("curve"), dict)]
    exact = [r for r in mine if r.get("variant") == prefix]
    return exact[0] if exact else max(mine, key=lambda r: r.get("merged_mean", 0.0)) if mine else None


def curves(summary: dict) -> dict | None:
    """{"steps", "merged", "single", "names"} of CopRA − LoRA per step; None without per-seed curves."""
    rows = [r for r in summary.get("points") or [] if isinstance(r, dict)]
    copra, lora = _best(rows, "CopRA"), _best(rows, "LoRA")
    if copra is None or lora is None or not copra["curve"].get("merged") or not lora["curve"].get("merged"):
        return None
    seeds = len((summary.get("config") or {}).get("seeds") or [])
    keep = disjoint_pairs(list(itertools.combinations(range(seeds), 2)))
    c, l = copra["curve"], lora["curve"]
    out = {"steps": [], "merged": [], "single": [], "names": (copra["variant"], lora["variant"])}
    try:
        for step in (k for k in c["steps"] if k in l["steps"]):
            i, j = c["steps"].index(step), l["steps"].index(step)
            if not keep or {len(c["merged"][i]), len(l["merged"][j])} != {seeds * (seeds - 1) // 2}:
                return None  # the pairs do not match the seeds: nothing to pair
            out["merged"].append(compare([c["merged"][i][k] for k in keep], [l["merged"][j][k] for k in keep],
                                         CONFIDENCE))
            out["single"].append(compare(c["single"][i], l["single"][j], CONFIDENCE))
            out["steps"].append(step)
    except (KeyError, IndexError, TypeError, ValueError):
        return None  # an incomplete or older curve
    return out if out["steps"] else None


def _cell(c: Comparison) -> str:
    ci = "no interval" if c.low is None else f"[{100 * c.low:+.1f}, {100 * c.high:+.1f}]"
    return f"{100 * c.difference:+.1f} {ci}, {c.verdict}"


def table(data: dict) -> str:
    lines = ["| step | merged (fused seed pairs): CopRA − LoRA, 95% CI | single adapters: CopRA − LoRA, 95% CI |",
             "|---|---|---|"]
    lines += [f"| {s} | {_cell(m)} | {_cell(x)} |" for s, m, x in zip(data["steps"], data["merged"], data["single"])]
    return "\n".join(lines)


def summary_line(data: dict) -> str:
    """Plain words: from which step CopRA's merged accuracy is shown to be higher, or where it comes closest."""
    steps = data["steps"]
    held = [s for s, m in zip(steps, data["merged"]) if m.verdict == "held"]
    if held and held == steps[steps.index(held[0]):]:
        return f"CopRA's merged accuracy is shown higher than LoRA's from step {held[0]} on ({len(held)} of " \
               f"{len(steps)} steps)."
    if held:
        return f"CopRA's merged accuracy is shown higher than LoRA's at steps {', '.join(map(str, held))} only " \
               f"({len(held)} of {len(steps)} steps)."
    closest = max(zip(data["steps"], data["merged"]), key=lambda x: x[1].difference)
    return (f"CopRA's merged accuracy is not shown higher than LoRA's at any length here; it comes closest at step "
            f"{closest[0]} ({100 * closest[1].difference:+.1f} points).")


def png(data: dict) -> bytes:
    """The figure: differences (points) with CI bars against the step, merged and single, a zero line."""
    from copra.experiments.common import new_axes

    figure, ax = new_axes(7.0, 3.8)
    for offset, key, label in ((-0.01, "merged", "merged (fused seed pairs)"), (0.01, "single", "single adapters")):
        xs = [s * (1 + offset) for s in data["steps"]]
        ys = [100 * c.difference for c in data[key]]
        low = [0 if c.low is None else 100 * (c.difference - c.low) for c in data[key]]
        high = [0 if c.high is None else 100 * (c.high - c.difference) for c in data[key]]
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


def figures(sweeps: list[tuple[Path, dict]]) -> dict[str, tuple[Path, dict, dict, bytes]]:
    """{report file name: (summary path, summary, CopRA − LoRA per step, PNG)} for sweeps with per-seed curves
    (only sweeps named "crossover..." where there are any: the converged suite's other curve sweeps share their runs)."""
    named = [(path, summary) for path, summary in sweeps if str(summary.get("name", "")).startswith("crossover")]
    sweeps = named or sweeps
    found = [(path, summary, data) for path, summary in sweeps if (data := curves(summary))]
    return {f"paper_report_crossover{'' if n == 0 else f'-{n}'}.png": (path, summary, data, png(data))
            for n, (path, summary, data) in enumerate(found)}


def sections(found: dict[str, tuple[Path, dict, dict, bytes]], root: Path, embed: dict[str, str] | None) -> list[str]:
    """The report's first section: the figure(s) and tables; with `embed` (HTML) the PNGs go in as data URIs."""
    parts = []
    for name, (path, summary, data, image) in found.items():
        ref = name
        if embed is not None:
            ref = f"copra-image-{len(embed)}"
            embed[ref] = "data:image/png;base64," + base64.b64encode(image).decode("ascii")
        parts += [f"*{summary.get('name', 'sweep')} on {summary.get('task')}, from {path.relative_to(root).as_posix()}. "
                  f"{summary_line(data)}*", "", f"![crossover]({ref})", "", table(data), ""]
    if not parts:
        return []
    return ['<a id="crossover"></a>', "", "## Crossover: from what training length does CopRA pay?", "",
            "CopRA minus LoRA (accuracy points) at each snapshot step of the same runs, with 95% paired "
            "t-intervals: merged = fused disjoint seed pairs, single = each seed's adapter.", "", *parts]
