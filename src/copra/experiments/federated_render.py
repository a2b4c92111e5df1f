"""`copra federated`'s summary as Markdown (`render`, `table`, `diagnostics_table`) and a PNG (`plot`, `draw`).

Split from `copra.experiments.federated` (which runs the protocol and re-exports these), so each stays short.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from copra.experiments.runner.common import save_figure, zoom_bars


def table(summary: dict) -> str:
    """Markdown table: client (mean of clients) vs merged accuracy per method, mean ± std over seeds."""
    lines = ["| method | client acc | merged acc | merged − client |", "|---|---|---|---|"]
    for method, s in summary["summary"].items():
        lines.append(
            f"| {method} | {100 * s['client_mean']:.1f} ± {100 * s['client_std']:.1f} | "
            f"{100 * s['merged_mean']:.1f} ± {100 * s['merged_std']:.1f} | "
            f"{100 * (s['merged_mean'] - s['client_mean']):+.1f} |"
        )
    return "\n".join(lines)


def diagnostics_table(summary: dict) -> list[str]:
    """Markdown lines: the last merge beside its controls per method (means over seeds), or why there are none."""
    rows = {m: s["diagnostics"] for m, s in summary["summary"].items() if "diagnostics" in s}
    if not rows:
        skipped = summary.get("diagnostics_skipped")
        return [f"No merge diagnostics ({skipped}).", ""] if skipped and skipped != "diagnostics=false" else []
    lines = [
        "Why the merge loses what it loses (accuracy in %, last round, means over seeds; client: mean of the accepted "
        "clients' own adapters; barrier = client - fused = averaging (client - mixture) + misalignment (mixture - "
        "fused); shrinkage = client - client x w_i^2, its own share in the fusion at w_i = n_i / N; scaled: the fused "
        "update times the lambda best on a validation set from the training pool):",
        "",
        "| method | client | fused | mixture | client x w² | barrier | averaging | misalign. | shrinkage | CE barrier "
        "| scaled (lambda) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, d in rows.items():
        scaled = f"{d['scaled']:.1f} ({d['scale']:g})" if "scaled" in d else "–"
        lines.append(
            f"| {method} | {d['client']:.1f} | {d['fused']:.1f} | {d['mixture']:.1f} | {d['fused_share']:.1f} | "
            f"{d['barrier']:+.1f} | {d['averaging']:+.1f} | {d['misalignment']:+.1f} | {d['shrinkage']:+.1f} | "
            f"{d['barrier_ce']:+.3f} | {scaled} |"
        )
    return [*lines, ""]


def render(summary: dict) -> str:
    c = summary["config"]
    rounds = ("one-shot (1 round)" if c["rounds"] == 1 else f"{c['rounds']} rounds") + (
        ", shared round-0 init" if c["shared_init"] else ", each client from its own init"
    )
    text = [
        "## Federated learning: client vs merged accuracy",
        "",
        f"Task {summary['task']}: {c['shots']} shots per class split at random over {c['clients']} clients, "
        f"{c['steps']} steps of batch {c['batch_size']} per client per round, lr {c['lr']}, {rounds}; the server "
        f"merges with `{c.get('merge_method', 'fusion')}` weighted by client size (FedAvg = `fusion`). Seeds {c['seeds']}; accuracy (%) on "
        f"{summary['eval_examples']} evaluation examples, last round, mean ± std over seeds.",
        "",
        table(summary),
        "",
    ]
    text += diagnostics_table(summary)
    if c.get("dp_noise_multiplier"):
        text += [
            f"Differentially private merge: each update clipped to L2 norm {c['dp_clip_norm']:g}, unweighted mean, "
            f"Gaussian noise of std {c['dp_noise_multiplier']:g} x {c['dp_clip_norm']:g} / accepted replies "
            "(no (epsilon, delta) computed; docs/federated.md).",
            "",
        ]
    if c["rounds"] > 1:
        text += [
            "Merged accuracy by round: "
            + "; ".join(
                f"{m} " + " → ".join(f"{100 * a:.1f}" for a in s["merged_by_round"])
                for m, s in summary["summary"].items()
            ),
            "",
        ]
    text += ["![client vs merged accuracy](federated.png)", ""]
    return "\n".join(text)


def plot(summary: dict, path: Path) -> Path:
    """`draw(summary)` as a PNG at `path`."""
    return save_figure(draw(summary), path, dpi=120)


def draw(summary: dict):
    """Bars: client vs merged accuracy per method (error bars: std over seeds); multi-round: merged by round."""
    from matplotlib.figure import Figure

    s, rounds = summary["summary"], summary["config"]["rounds"]
    figure = Figure(figsize=(9 if rounds > 1 else 5, 3.6), layout="tight")
    axes = figure.subplots(1, 2 if rounds > 1 else 1, squeeze=False)
    ax, x = axes[0][0], np.arange(len(s))
    for offset, key, label in (
        (-0.2, "client", "clients (mean)"),
        (0.2, "merged", f"merged ({summary['config'].get('merge_method', 'fusion')})"),
    ):
        ax.bar(
            x + offset,
            [100 * v[f"{key}_mean"] for v in s.values()],
            0.4,
            label=label,
            yerr=[100 * v[f"{key}_std"] for v in s.values()],
            capsize=4,
        )
    zoom_bars(ax, [100 * v[f"{key}_mean"] for v in s.values() for key in ("client", "merged")])
    ax.set_xticks(x, list(s))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{summary['task']}: {summary['config']['clients']} clients")
    ax.legend(fontsize=8)
    if rounds > 1:
        ax = axes[0][1]
        for method, v in s.items():
            mean, std = 100 * np.array(v["merged_by_round"]), 100 * np.array(v["merged_by_round_std"])
            ax.plot(range(1, rounds + 1), mean, marker="o", label=method)
            ax.fill_between(range(1, rounds + 1), mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("round")
        ax.set_ylabel("merged accuracy (%)")
        ax.set_xticks(range(1, rounds + 1))
        ax.legend(fontsize=8)
    return figure
