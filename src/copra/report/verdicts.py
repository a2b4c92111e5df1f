"""The paper's claims, CopRA vs LoRA, one verdict function per experiment, with statistics.

`SECTIONS` maps an experiment name (the `"experiment"` key of its summary JSON) to where the report
places it (the paper's label and order), the paper's claim in one line and a verdict function
`summary -> [(claim, status, numbers), ...]`. Every claim pairs CopRA's and LoRA's per-seed scores
(same seed: same few-shot sample, initial A and evaluation set) and judges them with
`copra.analysis.stats.compare`: mean difference, 95% paired t-interval over seeds, and *held* (the interval
lies in the paper's direction), *reversed* (it lies the other way) or *no difference shown*.
Merged accuracies of seed pairs count only disjoint pairs (independent replicates). A summary
without per-seed scores (written by an older copra) reads "not measured", never an exception.
A new experiment plugs into `copra report` with one entry here.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from copra.analysis.stats import HELD, NO_DIFFERENCE, REVERSED, Comparison, compare, disjoint_pairs

UNMEASURED, PARTLY, PARTLY_REVERSED, MIXED = "not measured", "partly held", "partly reversed", "mixed"
PROTOCOL = "protocol step"  # a step that makes no CopRA-vs-LoRA claim (lr_select picks the lrs the others use)
NOT_HELD = REVERSED  # the former name of the opposite verdict
CONFIDENCE = 0.95
Check = tuple[str, str, str]  # (claim, status, the numbers that decide it)
RULES = (
    f"Every claim pairs CopRA and LoRA by seed (same few-shot sample, initial A and evaluation set) and "
    f"reports the mean difference CopRA − LoRA with a {CONFIDENCE:.0%} paired t-interval over seeds "
    "(differences normal, seeds independent; merged accuracies of seed pairs count only disjoint pairs). "
    f"*{HELD}*: the interval lies on the paper's side of 0; *{REVERSED}*: it lies on the other side; "
    f"*{NO_DIFFERENCE}*: it contains 0, or there is one seed and so no interval. A claim over several "
    f"settings is *{PARTLY}* / *{PARTLY_REVERSED}* when only some settings decide, *{MIXED}* when they "
    f"disagree; per-layer Shapley values are *{HELD}* when a majority of layers is. *{UNMEASURED}*: the summary "
    "lacks per-seed scores. Accuracies in points (%)."
)


def _dig(data, *path):
    """data[path[0]][path[1]]..., or None where a step is missing."""
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def describe(
    c: Comparison, unit: float = 100, digits: int = 1, label: str = "CopRA − LoRA", what: str = "seed"
) -> str:
    """'CopRA − LoRA +4.0, 95% CI [+1.2, +6.8], 5 seeds' (no interval with one seed)."""
    f = lambda v: f"{unit * v:+.{digits}f}"  # noqa: E731
    ci = "no interval" if c.low is None else f"{c.confidence:.0%} CI [{f(c.low)}, {f(c.high)}]"
    return f"{label} {f(c.difference)}, {ci}, {c.n} {what}{'s' if c.n != 1 else ''}"


def _paired(
    claim: str,
    copra: Sequence[float] | None,
    lora: Sequence[float] | None,
    unit: float = 100,
    digits: int = 1,
    lower: bool = False,
    names: tuple[str, str] = ("CopRA", "LoRA"),
    what: str = "seed",
) -> Check:
    """One claim judged by `compare` on per-seed scores (`lower`: smaller is better, e.g. seconds)."""
    if not copra or not lora:
        return claim, UNMEASURED, "no per-seed scores in the summary (rerun with this version to judge it)"
    if len(copra) != len(lora):
        return claim, UNMEASURED, f"unpaired: {len(copra)} {names[0]} and {len(lora)} {names[1]} scores"
    c = compare([-v for v in copra], [-v for v in lora], CONFIDENCE) if lower else compare(copra, lora, CONFIDENCE)
    label = f"{names[1]} − {names[0]}" if lower else f"{names[0]} − {names[1]}"
    means = (
        f"{names[0]} {unit * statistics.fmean(copra):.{digits}f} vs "
        f"{names[1]} {unit * statistics.fmean(lora):.{digits}f}"
    )
    return claim, c.verdict, f"{means}; {describe(c, unit, digits, label, what)}"


def combine(statuses: Sequence[str]) -> str:
    """One status for several settings: all agree -> that; else partly held / partly reversed / mixed."""
    measured = {s for s in statuses if s != UNMEASURED}
    if len(measured) <= 1:
        return measured.pop() if measured else UNMEASURED
    if {HELD, REVERSED} <= measured or {PARTLY, REVERSED} <= measured or MIXED in measured:
        return MIXED
    return PARTLY if HELD in measured or PARTLY in measured else PARTLY_REVERSED


def _demo(s: dict) -> list[Check]:
    tasks = s.get("tasks") or {}
    checks = [
        _paired(
            f"{task}: CopRA's accuracy vs LoRA's (paper: CopRA ≥ LoRA)",
            _dig(row, "runs", "copra", "accuracy"),
            _dig(row, "runs", "lora", "accuracy"),
        )
        for task, row in tasks.items()
    ]
    step = lambda m: [t for r in tasks.values() for t in (_dig(r, "runs", m, "step_seconds") or [])]  # noqa: E731
    checks.append(
        _paired(
            "CopRA's training step is no slower than LoRA's (s/step; pairs: task x seed)",
            step("copra"),
            step("lora"),
            unit=1,
            digits=3,
            lower=True,
            what="run",
        )
    )
    return checks


def _federated(s: dict) -> list[Check]:
    def merged(method: str) -> dict:
        return {r.get("seed"): _dig(r, "rounds", -1, "merged_accuracy") for r in _dig(s, "runs", method) or []}

    copra, lora = merged("copra"), merged("lora")
    seeds = [k for k in copra if k in lora and copra[k] is not None and lora[k] is not None]
    return [
        _paired(
            "CopRA's merged (server) accuracy is above LoRA's", [copra[k] for k in seeds], [lora[k] for k in seeds]
        )
    ]


def _multitask(s: dict) -> list[Check]:
    def average(method: str) -> list[float]:
        runs = _dig(s, "methods", method, "runs") or []
        return [statistics.fmean(r["merged"].values()) for r in runs if _dig(r, "merged")]

    return [
        _paired(
            "CopRA's merged adapter is more accurate than LoRA's (average over tasks)",
            average("copra"),
            average("lora"),
        )
    ]


def _shapley(s: dict) -> list[Check]:
    copra, lora = ([r.get("values") for r in _dig(s, "methods", m, "runs") or []] for m in ("copra", "lora"))
    claim = "CopRA's layers have higher Shapley values than LoRA's, in most layers"
    if not copra or not lora or not copra[0] or len(copra) != len(lora) or len(copra[0]) != len(lora[0]):
        return [(claim, UNMEASURED, "needs per-seed, per-layer values of both LoRA and CopRA")]
    layers = [compare([v[j] for v in copra], [v[j] for v in lora], CONFIDENCE) for j in range(len(copra[0]))]
    count = {v: sum(c.verdict == v for c in layers) for v in (HELD, REVERSED)}
    status = next((v for v in (HELD, REVERSED) if count[v] > len(layers) / 2), NO_DIFFERENCE)
    numbers = (
        f"held in {count[HELD]}, reversed in {count[REVERSED]} of {len(layers)} layers; per layer "
        + "; ".join(f"{j}: {1e2 * c.difference:+.2f}" for j, c in enumerate(layers))
        + " (x1e-2)"
    )
    return [
        (claim, status, numbers),
        _paired(
            "CopRA's weakest layer is worth more than LoRA's weakest",
            [min(v) for v in copra],
            [min(v) for v in lora],
            unit=1,
            digits=4,
        ),
    ]


def _landscape(s: dict) -> list[Check]:
    from copra.experiments.runner.common import barrier

    alphas = s.get("alphas") or []
    half = next((i for i, a in enumerate(alphas) if abs(a - 0.5) < 1e-9), None)
    curves = lambda name: _dig(s, "curves", name, "accuracy") or []  # noqa: E731 [pair][alpha]

    def pick(name: str, f) -> list[float]:
        """f of each disjoint pair's curve; pairs are consecutive seeds (0,1), (1,2), ...: keep (0,1), (2,3), ..."""
        pairs = curves(name)
        return [f(pairs[k]) for k in disjoint_pairs([(k, k + 1) for k in range(len(pairs))])]

    at_half = lambda name: pick(name, lambda a: a[half]) if half is not None else None  # noqa: E731
    barriers = lambda name: pick(name, lambda a: barrier(a, alphas))  # noqa: E731
    return [
        _paired("CopRA's fusion at alpha = 0.5 is above LoRA's", at_half("copra/fusion"), at_half("lora/fusion")),
        _paired(
            "CopRA's fusion barrier is lower than LoRA's",
            barriers("copra/fusion"),
            barriers("lora/fusion"),
            lower=True,
        ),
        _paired(
            "LoRA Align raises CopRA's fusion at alpha = 0.5",
            at_half("copra+align/fusion"),
            at_half("copra/fusion"),
            names=("with Align", "without"),
        ),
    ]


def _pruning(s: dict) -> list[Check]:
    def per_seed(kind: str, method: str, only: str | None = None) -> list[float] | None:
        rows, other = _dig(s, kind, method) or {}, _dig(s, kind, "lora" if method == "copra" else "copra") or {}
        keys = [k for k in rows if k in other and k not in ("all", "0", "0.0") and only in (None, k)]
        values = [_dig(rows, k, "values") for k in keys]
        if not keys or any(not v or len(v) != len(values[0]) for v in values):
            return None
        return [statistics.fmean(v[i] for v in values) for i in range(len(values[0]))]

    checks = [
        _paired(
            f"CopRA keeps more accuracy under {kind} pruning (mean over the pruned settings)",
            per_seed(kind, "copra"),
            per_seed(kind, "lora"),
        )
        for kind in ("structured", "unstructured")
    ]
    return checks + [
        _paired(
            "CopRA keeps more accuracy with every other layer's adapter dropped",
            per_seed("structured", "copra", "every_other"),
            per_seed("structured", "lora", "every_other"),
        )
    ]


def _pair_scores(merged: Sequence[float], seeds: int) -> list[float]:
    """The merged accuracies of disjoint seed pairs, from the list over itertools.combinations(seeds, 2)."""
    pairs = list(itertools.combinations(range(seeds), 2))
    return [merged[k] for k in disjoint_pairs(pairs)] if len(merged) == len(pairs) else []


def _curves(s: dict) -> list[Check]:
    """Fig. 6c: the best CopRA setting against the best LoRA setting, step by step (`crossover.curves`)."""
    from copra.report.crossover import curves

    claim = "the best CopRA setting's merged accuracy is above the best LoRA setting's over training steps"
    data = curves(s)
    if data is None:
        return [(claim, UNMEASURED, "needs CopRA and LoRA variants with per-pair curves (rerun with this version)")]
    numbers = "; ".join(f"step {k}: {describe(x)}" for k, x in zip(data["steps"], data["merged"]))
    return [
        (claim, combine([x.verdict for x in data["merged"]]), f"{data['names'][0]} vs {data['names'][1]}: {numbers}")
    ]


COPRA_ONLY = ("method", "ramp_fraction", "ramp", "initial_p", "final_p", "granularity")  # LoRA ignores these


def _counterpart(variant: str, variants: dict) -> str | None:
    """The LoRA variant trained like `variant` (same lr, lr schedule, ...), else the one named "LoRA"."""
    mine = {k: v for k, v in (variants.get(variant) or {}).items() if k not in COPRA_ONLY}
    same = [
        name
        for name, v in variants.items()
        if (v or {}).get("method") == "lora" and {k: x for k, x in v.items() if k not in COPRA_ONLY} == mine
    ]
    return same[0] if same else ("LoRA" if "LoRA" in variants else None)


def _variant_pairs(s: dict) -> list[Check]:
    """Sweeps with several CopRA variants (the converged suite's `schedules`): each against its LoRA
    counterpart at the end of training, merged accuracy over disjoint seed pairs and single accuracy."""
    rows = {r.get("variant"): r for r in s.get("points") or [] if isinstance(r, dict)}
    variants = _dig(s, "config", "variants") or {}
    seeds = len(_dig(s, "config", "seeds") or [])
    checks = []
    for name, overrides in variants.items():
        lora = _counterpart(name, variants) if (overrides or {}).get("method") == "copra" else None
        if lora is None or name not in rows or lora not in rows:
            continue
        checks.append(
            _paired(
                f"{name} merges better than {lora} (fused disjoint seed pairs)",
                _pair_scores(rows[name].get("merged") or [], seeds),
                _pair_scores(rows[lora].get("merged") or [], seeds),
                names=(name, lora),
            )
        )
        checks.append(
            _paired(
                f"{name} is as accurate as {lora} before merging (single adapters)",
                rows[name].get("single"),
                rows[lora].get("single"),
                names=(name, lora),
            )
        )
    return checks or [("CopRA variants against their LoRA counterparts", UNMEASURED, "no CopRA/LoRA pair of variants")]


def _sweep(s: dict) -> list[Check]:
    rows = [r for r in s.get("points") or [] if isinstance(r, dict)]
    if sum(
        1 for v in (_dig(s, "config", "variants") or {}).values() if (v or {}).get("method") == "copra"
    ) > 1 and not _dig(s, "config", "grid"):
        return _variant_pairs(s)
    if any("curve" in r for r in rows):
        return _curves(s)
    names = {r.get("variant") for r in rows}
    copra = "CopRA" if "CopRA" in names else "CopRA linear"
    by = {v: {r["label"]: r for r in rows if r.get("variant") == v} for v in (copra, "LoRA")}
    common = [k for k in by[copra] if k in by["LoRA"]]
    claim = "CopRA's merged accuracy (fused disjoint seed pairs) is above LoRA's at every setting"
    if not common:
        return [(claim, UNMEASURED, "needs LoRA and CopRA at the same settings")]
    seeds = len(_dig(s, "config", "seeds") or [])
    checks = [
        _paired(
            k,
            _pair_scores(by[copra][k].get("merged") or [], seeds),
            _pair_scores(by["LoRA"][k].get("merged") or [], seeds),
        )
        for k in common
    ]
    step = lambda v: [t for k in common for t in (by[v][k].get("step_seconds") or [])]  # noqa: E731
    return [
        (
            claim,
            combine([status for _, status, _ in checks]),
            f"{copra} vs LoRA: " + "; ".join(f"{k}: {status}, {numbers}" for k, status, numbers in checks),
        ),
        _paired(
            "CopRA's training step is cheaper than LoRA's (s/step; pairs: setting x seed)",
            step(copra),
            step("LoRA"),
            unit=1,
            digits=3,
            lower=True,
            what="run",
        ),
    ]


def _sweep_place(s: dict) -> tuple[str, float]:
    axes = s.get("axes") or []
    if any(isinstance(r, dict) and "curve" in r for r in s.get("points") or []):
        return "Fig. 6c", 6.2
    if "steps" in axes:
        return "Fig. 6", 6.0
    if axes == ["lr"]:
        return ("Fig. 5a, 5b" if "tsne" in s else "Fig. 5b"), 5.0
    return "Sweep", 6.5


def _lr_select(summary: dict) -> list[Check]:
    picked = ", ".join(f"{method} {lr:g}" for method, lr in summary["best"].items())
    return [
        (
            "no claim: each method's peak lr, picked on a validation split, for the later steps",
            PROTOCOL,
            f"picked: {picked}",
        )
    ]


def _merge_map(summary: dict) -> list[Check]:
    kept = summary.get("kept", [])
    threshold = summary["config"]["keep_barrier"]
    lora = [r["barrier"] for r in summary["rows"] if r["method"] == "lora"]
    found = ", ".join(f"{k['task']} {k['cell']} ({k['lora_barrier']:.1f})" for k in kept) or "none"
    fit = summary.get("where", {}).get("fit")
    where = (
        f"; CopRA's fused gain vs LoRA's barrier: slope {fit['slope']:.2f} (95% CI {fit['low']:.2f} to {fit['high']:.2f})"
        if fit
        else ""
    )
    return [
        (
            f"no claim: where LoRA's seed-pair fusion loses at least {threshold:g} points (validation split)",
            PROTOCOL,
            f"LoRA's barrier {min(lora):.1f} to {max(lora):.1f} points over {len(lora)} cells; kept: {found}{where}",
        )
    ]


def _merge_protocol(summary: dict) -> list[Check]:
    checks = []
    for endpoint, e in summary["analysis"]["endpoints"].items():
        pooled = e["pooled"]
        interval = f", 95% CI {pooled['low']:+.2f} to {pooled['high']:+.2f}" if pooled else ""
        checks.append(
            (
                f"CopRA beats LoRA on {endpoint} (primary, Holm-adjusted)",
                e["verdict"],
                f"{e['mean_difference']:+.2f} points over {e['rows']} rows{interval}; p {e['p']:.4f}, "
                f"Holm {e['p_holm']:.4f}",
            )
        )
    return checks


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
    "demo": Section(
        "Summary",
        "LoRA vs CopRA, single adapters",
        0,
        "similar accuracy before merging (Table 1 'origin': CopRA ≥ LoRA), with no extra training time",
        _demo,
        render=_render_demo,
    ),
    "merge_protocol": Section(
        "Answer",
        "Do CopRA's adapters merge and prune better? The pre-registered endpoints",
        -1.0,
        "CopRA's adapters merge (seed pairs, FL, MTL) and prune better than LoRA's where LoRA's merges break",
        _merge_protocol,
    ),
    "merge_map": Section("Map", "Where LoRA's merges break", -0.5, "no claim (it finds where to ask)", _merge_map),
    "lr_select": Section("Protocol", "Learning rate per method", 0.5, "no claim (a protocol step)", _lr_select),
    "federated": Section(
        "Table 1 (FL)",
        "Federated learning: clients vs merged",
        1.0,
        "clients as accurate as LoRA's, but CopRA aggregates better",
        _federated,
    ),
    "multitask": Section(
        "Table 1 (MTL)", "Multi-task merging", 1.1, "fused task adapters: CopRA's merge beats LoRA's", _multitask
    ),
    "shapley": Section(
        "Fig. 2", "Per-layer Shapley values", 2.0, "CopRA optimizes each layer's Shapley value (Sec. 2.2)", _shapley
    ),
    "landscape": Section(
        "Fig. 3",
        "Merging landscape over alpha",
        3.0,
        "CopRA fuses far better than LoRA at alpha = 0.5 (linear mode connectivity); LoRA Align improves it further",
        _landscape,
    ),
    "pruning": Section(
        "Fig. 4",
        "Structured and unstructured pruning",
        4.0,
        "CopRA keeps more accuracy than LoRA when pruned",
        _pruning,
    ),
    "sweep": Section(
        "Fig. 5-6",
        "Sweep: single vs merged accuracy",
        5.0,
        "CopRA merges better than LoRA at every learning rate and iteration count, and trains faster per step",
        _sweep,
        place=_sweep_place,
    ),
}
OTHER = Section("Other", "", 99.0, "no claim recorded for this experiment")


def judge(name: str, summary: dict) -> list[Check]:
    """The experiment's checks; 'not measured' where the summary lacks what decides one."""
    section = SECTIONS.get(name, OTHER)
    if section.verdict is None:
        return [(section.claim, UNMEASURED, "no verdict function (add a SECTIONS entry in copra.report.verdicts)")]
    try:
        return section.verdict(summary)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as error:
        return [(section.claim, UNMEASURED, f"the summary lacks what decides it ({type(error).__name__}: {error})")]


def overall(checks: list[Check]) -> str:
    """One status for a section: the checks' common status, else partly held / partly reversed / mixed."""
    return combine([status for _, status, _ in checks])
