"""The paper's claims, CopRA vs LoRA, one verdict function per experiment: did the direction hold here?

`SECTIONS` maps an experiment name (the `"experiment"` key of its summary JSON) to where the report
places it (the paper's label and order), the paper's claim in one line and a verdict function
`summary -> [(claim, status, numbers), ...]` with status held / did not hold / partly held / not
measured. A verdict reads the summary with `_dig`, so a missing key means "not measured", never an
exception. A new experiment plugs into `copra report` with one entry here.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

HELD, NOT_HELD, PARTLY, UNMEASURED = "held", "did not hold", "partly held", "not measured"
Check = tuple[str, str, str]  # (claim, status, the numbers that decide it)


def _dig(data, *path):
    """data[path[0]][path[1]]..., or None where a step is missing."""
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _ms(row, mean: str = "mean", std: str = "std") -> tuple[float, float | None] | None:
    """(mean, std) of a summary row, None if it has no mean."""
    return None if _dig(row, mean) is None else (row[mean], _dig(row, std))


def _compare(claim: str, copra, lora, unit: float = 100, digits: int = 1, tolerance: float = 0.0,
             lower: bool = False, names: tuple[str, str] = ("CopRA", "LoRA")) -> Check:
    """Held when CopRA's mean is above LoRA's (below with `lower`; `tolerance` allows a shortfall)."""
    if copra is None or lora is None:
        return claim, UNMEASURED, f"no {names[0] if copra is None else names[1]} result in the summary"
    (cm, cs), (lm, ls) = copra, lora
    if lower:
        held = cm <= lm + tolerance
    else:
        held = cm >= lm - tolerance if tolerance else cm > lm
    fmt = lambda m, s: f"{unit * m:.{digits}f}" + ("" if s is None else f" ± {unit * s:.{digits}f}")  # noqa: E731
    spread = max(s or 0.0 for s in (cs, ls))
    note = ", within one std over seeds" if 0 < spread and abs(cm - lm) <= spread else ""
    return (claim, HELD if held else NOT_HELD,
            f"{names[0]} {fmt(cm, cs)} vs {names[1]} {fmt(lm, ls)} (difference {unit * (cm - lm):+.{digits}f}{note})")


def _demo(s: dict) -> list[Check]:
    checks = []
    for task, row in (s.get("tasks") or {}).items():
        copra, lora = _ms(_dig(row, "runs", "copra")), _ms(_dig(row, "runs", "lora"))
        spread = max([x[1] or 0.0 for x in (copra, lora) if x] or [0.0])
        checks.append(_compare(f"{task}: CopRA's accuracy matches LoRA's (no lower than one std)", copra, lora,
                               tolerance=spread))
    step = lambda m: [t for r in (s.get("tasks") or {}).values()  # noqa: E731
                      if (t := _dig(r, "runs", m, "seconds_per_step")) is not None]
    copra, lora = step("copra"), step("lora")
    checks.append(_compare("CopRA's training step is no slower than LoRA's (s/step, mean over tasks)",
                           (statistics.fmean(copra), None) if copra else None,
                           (statistics.fmean(lora), None) if lora else None, unit=1, digits=3, lower=True))
    return checks


def _federated(s: dict) -> list[Check]:
    merged = lambda m: _ms(_dig(s, "summary", m), "merged_mean", "merged_std")  # noqa: E731
    return [_compare("CopRA's merged (server) accuracy is above LoRA's", merged("copra"), merged("lora"))]


def _multitask(s: dict) -> list[Check]:
    merged = lambda m: _ms(_dig(s, "methods", m, "merged", "average"))  # noqa: E731
    return [_compare("CopRA's merged adapter is more accurate than LoRA's (average over tasks)",
                     merged("copra"), merged("lora"))]


def _shapley(s: dict) -> list[Check]:
    copra, lora = _dig(s, "methods", "copra", "mean"), _dig(s, "methods", "lora", "mean")
    claim = "CopRA's layers have higher Shapley values than LoRA's, in most layers"
    if not copra or not lora or len(copra) != len(lora):
        return [(claim, UNMEASURED, "needs per-layer values of both LoRA and CopRA")]
    higher = sum(a > b for a, b in zip(copra, lora))
    return [(claim, HELD if higher > len(copra) / 2 else NOT_HELD, f"higher in {higher} of {len(copra)} layers"),
            _compare("CopRA's weakest layer is worth more than LoRA's weakest", (min(copra), None), (min(lora), None),
                     unit=1, digits=4)]


def _landscape(s: dict) -> list[Check]:
    half = next((i for i, a in enumerate(s.get("alphas") or []) if abs(a - 0.5) < 1e-9), None)
    claims = ("CopRA's fusion at alpha = 0.5 is above LoRA's", "LoRA Align raises CopRA's fusion at alpha = 0.5")
    if half is None:
        return [(claim, UNMEASURED, "alpha = 0.5 was not evaluated") for claim in claims]

    def at(curve: str) -> tuple[float, float | None] | None:
        row = _dig(s, "curves", curve)
        if _dig(row, "mean", half) is None:
            return None
        pairs = len(_dig(row, "accuracy") or [])
        return row["mean"][half], _dig(row, "std", half) if pairs > 1 else None  # one pair: no spread to show

    return [_compare(claims[0], at("copra/fusion"), at("lora/fusion")),
            _compare(claims[1], at("copra+align/fusion"), at("copra/fusion"), names=("with Align", "without"))]


def _pruning(s: dict) -> list[Check]:
    def mean_over(kind: str, method: str) -> tuple[float, None] | None:
        rows, other = _dig(s, kind, method), _dig(s, kind, "lora" if method == "copra" else "copra")
        keys = [k for k in rows or {} if k in (other or {}) and k not in ("all", "0", "0.0")]
        return (statistics.fmean(rows[k]["mean"] for k in keys), None) if keys else None

    return [_compare(f"CopRA keeps more accuracy under {kind} pruning (mean over the pruned settings)",
                     mean_over(kind, "copra"), mean_over(kind, "lora")) for kind in ("structured", "unstructured")]


def _curves(rows: list[dict]) -> list[Check]:
    """Fig. 6c: the best CopRA setting against the best LoRA setting, step by step."""
    claim = "the best CopRA setting's merged accuracy is above the best LoRA setting's over training steps"
    best = {}
    for prefix in ("CopRA", "LoRA"):
        mine = [r for r in rows if str(r.get("variant", "")).startswith(prefix) and "curve" in r]
        if mine:
            best[prefix] = max(mine, key=lambda r: r["merged_mean"])
    if len(best) < 2:
        return [(claim, UNMEASURED, "needs CopRA and LoRA variants with curves")]
    c, l = best["CopRA"]["curve"], best["LoRA"]["curve"]
    steps = [k for k in c["steps"] if k in l["steps"]]
    wins = sum(c["merged_mean"][c["steps"].index(k)] > l["merged_mean"][l["steps"].index(k)] for k in steps)
    return [(claim, HELD if wins == len(steps) else PARTLY if wins else NOT_HELD,
             f"above at {wins} of {len(steps)} steps ({best['CopRA']['variant']} vs {best['LoRA']['variant']}; final "
             f"{100 * best['CopRA']['merged_mean']:.1f} vs {100 * best['LoRA']['merged_mean']:.1f})")]


def _sweep(s: dict) -> list[Check]:
    rows = [r for r in s.get("points") or [] if isinstance(r, dict)]
    if any("curve" in r for r in rows):
        return _curves(rows)
    names = {r.get("variant") for r in rows}
    copra = "CopRA" if "CopRA" in names else "CopRA linear"
    by = {v: {r["label"]: r for r in rows if r.get("variant") == v} for v in (copra, "LoRA")}
    common = [k for k in by[copra] if k in by["LoRA"]]
    claim = "CopRA's merged accuracy (fused seed pairs) is above LoRA's at every setting"
    if not common:
        return [(claim, UNMEASURED, "needs LoRA and CopRA at the same settings")]
    wins = sum(by[copra][k]["merged_mean"] > by["LoRA"][k]["merged_mean"] for k in common)
    numbers = "; ".join(f"{k}: {100 * by[copra][k]['merged_mean']:.1f} vs {100 * by['LoRA'][k]['merged_mean']:.1f}"
                        for k in common)
    step = lambda v: (statistics.fmean(by[v][k]["seconds_per_step"] for k in common), None)  # noqa: E731
    return [(claim, HELD if wins == len(common) else PARTLY if wins else NOT_HELD,
             f"above in {wins} of {len(common)} ({copra} vs LoRA: {numbers})"),
            _compare("CopRA's training step is cheaper than LoRA's (s/step)", step(copra), step("LoRA"), unit=1,
                     digits=3, lower=True)]


def _sweep_place(s: dict) -> tuple[str, float]:
    axes = s.get("axes") or []
    if any(isinstance(r, dict) and "curve" in r for r in s.get("points") or []):
        return "Fig. 6c", 6.2
    if "steps" in axes:
        return "Fig. 6", 6.0
    if axes == ["lr"]:
        return ("Fig. 5a, 5b" if "tsne" in s else "Fig. 5b"), 5.0
    return "Sweep", 6.5


def _render_demo(summary: dict) -> str:
    from copra.experiments.demo import render

    return render(summary)


@dataclass(frozen=True)
class Section:
    """How the report places and judges one experiment."""

    label: str  #: the paper's label ("Fig. 3")
    title: str  #: section title
    order: float  #: position in the report (the paper's order)
    claim: str  #: the paper's direction, CopRA vs LoRA, in one line
    verdict: Callable[[dict], list[Check]] | None = None  #: summary -> checks
    place: Callable[[dict], tuple[str, float]] | None = None  #: summary -> (label, order), when it varies
    render: Callable[[dict], str] | None = None  #: default: the registered experiment's render


SECTIONS: dict[str, Section] = {
    "demo": Section("Summary", "LoRA vs CopRA, single adapters", 0, "similar accuracy before merging (Table 1 "
                    "'origin': CopRA ≥ LoRA), with no extra training time", _demo, render=_render_demo),
    "federated": Section("Table 1 (FL)", "Federated learning: clients vs merged", 1.0,
                         "clients as accurate as LoRA's, but CopRA aggregates better", _federated),
    "multitask": Section("Table 1 (MTL)", "Multi-task merging", 1.1,
                         "fused task adapters: CopRA's merge beats LoRA's", _multitask),
    "shapley": Section("Fig. 2", "Per-layer Shapley values", 2.0,
                       "CopRA optimizes each layer's Shapley value (Sec. 2.2)", _shapley),
    "landscape": Section("Fig. 3", "Merging landscape over alpha", 3.0, "CopRA fuses far better than LoRA at "
                         "alpha = 0.5 (linear mode connectivity); LoRA Align improves it further", _landscape),
    "pruning": Section("Fig. 4", "Structured and unstructured pruning", 4.0,
                       "CopRA keeps more accuracy than LoRA when pruned", _pruning),
    "sweep": Section("Fig. 5-6", "Sweep: single vs merged accuracy", 5.0, "CopRA merges better than LoRA at every "
                     "learning rate and iteration count, and trains faster per step", _sweep, place=_sweep_place),
}
OTHER = Section("Other", "", 99.0, "no claim recorded for this experiment")


def judge(name: str, summary: dict) -> list[Check]:
    """The experiment's checks; 'not measured' where the summary lacks what decides one."""
    section = SECTIONS.get(name, OTHER)
    if section.verdict is None:
        return [(section.claim, UNMEASURED, "no verdict function (add a SECTIONS entry in copra.experiments.verdicts)")]
    try:
        return section.verdict(summary)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as error:
        return [(section.claim, UNMEASURED, f"the summary lacks what decides it ({type(error).__name__}: {error})")]


def overall(checks: list[Check]) -> str:
    """One status for a section: held / did not hold when every measured check agrees, else partly held."""
    measured = {status for _, status, _ in checks if status != UNMEASURED}
    return UNMEASURED if not measured else measured.pop() if len(measured) == 1 else PARTLY
