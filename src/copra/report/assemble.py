"""`copra report RESULTS_DIR`: every experiment's summary in one Markdown file and one HTML page, in paper order.

Finds each `*.json` under RESULTS_DIR whose content names an experiment (`"experiment": name`, written by
`common.write_outputs` and the demo), renders it with the experiment's own `render` (one source of truth)
and adds, per section, the seeds, key config, wall time and whether the paper's direction (CopRA vs
LoRA) held here, with the numbers that decide it. Order as in the paper: the demo's core table as a
summary, Table 1 (FL, MTL), Fig. 2 (Shapley), Fig. 3 (landscape), Fig. 4 (pruning), Fig. 5-6 (sweeps).

Writes `paper_report.md` (images linked) and `paper_report.html` (self-contained: PNGs as data URIs,
inline CSS). Not `report.md`: that is the demo's own report and stays as the demo wrote it.

A new experiment plugs in with one entry in `copra.report.verdicts.SECTIONS` (paper label, title,
order, claim, verdict function); an experiment without one still gets a generic section built from its
registered render, or the `.md` and `.png` beside its JSON.
"""

from __future__ import annotations

import base64
import html
import json
import mimetypes
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from copra.experiments.runner.eval_cache import is_cache
from copra.report import convergence, crossover
from copra.report.verdicts import OTHER, RULES, SECTIONS, Section, judge, overall
from copra.utils.atomic import write_bytes, write_text
from copra.utils.errors import UserError, resource_error
from copra.utils.locks import folder_lock

NAMES = {"lora": "LoRA", "copra": "CopRA", "early_copra": "Early CopRA"}
OUTPUTS = ("paper_report.md", "paper_report.html")


# ----------------------------------------------------------------------------- finding summaries
@dataclass
class Entry:
    """One experiment summary found under the results folder."""

    name: str
    path: Path
    summary: dict

    @property
    def section(self) -> Section:
        return SECTIONS.get(self.name, OTHER)

    def place(self) -> tuple[str, float]:
        return self.section.place(self.summary) if self.section.place else (self.section.label, self.section.order)


def experiment_name(path: Path, data) -> str | None:
    """The experiment a JSON file summarises; None for other JSON (adapter metadata, run records)."""
    if not isinstance(data, dict):
        return None
    name = data.get("experiment")
    if isinstance(name, str) and name:
        return name
    if "experiment" not in data and path.stem in SECTIONS and isinstance(data.get("config"), dict):
        return path.stem  # written before summaries named their experiment
    return None


def find_summaries(results_dir: str | Path) -> list[Entry]:
    """Every experiment summary under `results_dir`, in report order; UserError if there is none."""
    root = Path(results_dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    entries = []
    for path in sorted(root.rglob("*.json")):
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if hidden or (path.parent / "adapter_config.json").exists() or is_cache(path.parent):
            continue  # temporary files, PEFT adapter folders, the evaluation cache
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue  # gone while we looked (a run tidying up)
        except ValueError as error:
            raise UserError(f"{path}: not valid JSON ({error}); fix or remove it") from None
        except OSError as error:
            raise UserError(f"{path}: cannot read it ({error.strerror or error})") from None
        name = experiment_name(path, data)
        if name:
            entries.append(Entry(name, path, data))
    if not entries:
        raise UserError(
            f'{root}: no experiment summaries under it (*.json naming an "experiment"); '
            "run `copra demo` or an experiment first"
        )
    return sorted(entries, key=lambda e: (e.place()[1], str(e.path)))


# ----------------------------------------------------------------------------- one section
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
CONFIG_KEYS = (
    "methods",
    "shots",
    "steps",
    "batch_size",
    "lr",
    "clients",
    "rounds",
    "alpha",
    "estimator",
    "samples",
    "grid",
    "model",
)


def _registered_render(name: str) -> Callable[[dict], str] | None:
    from copra.experiments import EXPERIMENTS

    return EXPERIMENTS[name]().render if name in EXPERIMENTS else None


def body(entry: Entry) -> str:
    """The experiment's own Markdown (its render, else the .md beside its JSON), first heading dropped."""
    render = entry.section.render or _registered_render(entry.name)
    text, note = None, ""
    if render is not None:
        try:
            text = render(entry.summary)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
            note = f"*This version's render cannot read the summary ({type(error).__name__}: {error}).*\n\n"
    if text is None:
        md = entry.path.with_suffix(".md")
        text = md.read_text(encoding="utf-8", errors="replace") if md.is_file() else "(no Markdown beside the JSON)"
    lines = text.strip().splitlines()
    text = "\n".join(lines[1:] if lines and lines[0].startswith("#") else lines)
    text = re.sub(r"^#{1,2} ", "### ", text, flags=re.M)  # below the section's own heading
    png = entry.path.with_suffix(".png")
    if png.is_file() and png.name not in {Path(ref).name for _, ref in IMAGE.findall(text)}:
        text += f"\n\n![{entry.name}]({png.name})"
    return note + text.strip()


def _plain(value) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def meta(entry: Entry, root: Path) -> str:
    """One line: seeds, key config, wall time, source file."""
    config = entry.summary.get("config") if isinstance(entry.summary.get("config"), dict) else {}
    parts = [f"seeds {_plain(config['seeds'])}" if "seeds" in config else "seeds not recorded"]
    parts += [f"{key.replace('_', ' ')} {_plain(config[key])}" for key in CONFIG_KEYS if key in config]
    parts.append(
        f"precision {entry.summary['precision']}"
        if isinstance(entry.summary.get("precision"), str)
        else "precision not recorded"
    )
    wall = entry.summary.get("wall_seconds")
    parts.append(f"wall time {_duration(wall)}" if isinstance(wall, (int, float)) else "wall time not recorded")
    return " · ".join(parts + [f"from {entry.path.relative_to(root).as_posix()}"])


def title(entry: Entry) -> str:
    s = entry.summary
    text = entry.section.title or entry.name
    if entry.path.stem != entry.name:
        text += f" ({entry.path.stem})"
    tasks = s.get("task") or (list(s["tasks"]) if isinstance(s.get("tasks"), (list, dict)) else None)
    seeds = (s.get("config") or {}).get("seeds") if isinstance(s.get("config"), dict) else None
    count = f", {len(seeds)} seed{'s' if len(seeds) != 1 else ''}" if isinstance(seeds, list) else ""
    return text + (f" on {_plain(tasks)}" if tasks else "") + count  # tells apart two runs of one experiment


def table_one(entries: list[Entry]) -> str | None:
    """The paper's Table 1 layout: origin / merge x method rows, one column per FL task and MTL task."""
    columns: list[tuple[str, dict]] = []  # (header, {(origin | merge, method): (mean, std)})
    for e in entries:
        s = e.summary
        try:
            if e.name == "federated":
                columns.append(
                    (
                        f"FL: {s['task']}",
                        {
                            (kind, m): (row[f"{key}_mean"], row[f"{key}_std"])
                            for m, row in s["summary"].items()
                            for kind, key in (("origin", "client"), ("merge", "merged"))
                        },
                    )
                )
            elif e.name == "multitask":
                columns += [
                    (
                        f"MTL: {t}",
                        {
                            (kind, m): (row[key][t]["mean"], row[key][t]["std"])
                            for m, row in s["methods"].items()
                            for kind, key in (("origin", "original"), ("merge", "merged"))
                        },
                    )
                    for t in s["tasks"]
                ]
        except (KeyError, TypeError, AttributeError):
            continue  # an incomplete summary: its own section says what it has
    if not columns:
        return None
    methods = list(dict.fromkeys(m for _, col in columns for _, m in col))
    lines = ["| | method | " + " | ".join(h for h, _ in columns) + " |", "|---|---|" + "---|" * len(columns)]
    for kind in ("origin", "merge"):
        for method in methods:
            cells = []
            for _, col in columns:
                cell = col.get((kind, method))
                best = max(v[0] for (k, _), v in col.items() if k == kind)
                text = "–" if cell is None else f"{100 * cell[0]:.1f} ± {100 * cell[1]:.1f}"
                cells.append(f"**{text}**" if cell is not None and cell[0] == best and len(methods) > 1 else text)
            lines.append(f"| {kind} | {NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the document
def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()


def _images(text: str, folder: Path, out: Path, embed: dict[str, str] | None) -> str:
    """Image links relative to `out` (Markdown), or tokens for data URIs collected in `embed` (HTML)."""

    def swap(match: re.Match) -> str:
        alt, ref = match.groups()
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+:", ref):  # a URL: kept in Markdown, never fetched by the page
            return match.group(0) if embed is None else f"*(external image left out: {ref})*"
        path = folder / ref
        if not path.is_file():
            return f"*(image missing: {_rel(path, out)})*"
        if embed is None:
            return f"![{alt}]({_rel(path, out)})"
        token = f"copra-image-{len(embed)}"
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        embed[token] = f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return f"![{alt}]({token})"

    return IMAGE.sub(swap, text)


def _badge(status: str, as_html: bool) -> str:
    return f'<span class="v {status.replace(" ", "-")}">{status}</span>' if as_html else f"**{status}**"


def document(
    entries: list[Entry],
    root: Path,
    out: Path,
    embed: dict[str, str] | None = None,
    figures: dict[str, tuple[Path, dict, dict, bytes]] | None = None,
) -> str:
    """The report as Markdown; with `embed` (a dict to fill), the variant the HTML page is built from."""
    as_html = embed is not None
    toc = ["| paper | section | paper's direction here |", "|---|---|---|"]
    parts, table_done = [], False
    for n, entry in enumerate(entries, 1):
        label, _ = entry.place()
        checks = judge(entry.name, entry.summary)
        if label.startswith("Table 1") and not table_done:
            table_done, table = True, table_one(entries)
            if table:
                parts += [
                    '<a id="table-1"></a>',
                    "",
                    "## Table 1: accuracy (%) before and after merging",
                    "",
                    "As in the paper: *origin* = the single adapters (FL: the clients' mean), *merge* = the "
                    "fused adapter; mean ± std over seeds, the better method in bold.",
                    "",
                    table,
                    "",
                ]
                toc.append("| Table 1 | [FL and MTL side by side](#table-1) | see FL and MTL |")
        anchor = f"s{n}-{re.sub(r'[^a-z0-9]+', '-', entry.name.lower())}"
        heading = title(entry)
        toc.append(f"| {label} | [{heading}](#{anchor}) | {_badge(overall(checks), as_html)} |")
        line = meta(entry, root)
        parts += [
            f'<a id="{anchor}"></a>',
            "",
            f"## {label}: {heading}",
            "",
            f'<p class="meta">{html.escape(line)}</p>' if as_html else f"*{line}*",
            "",
            f"**Paper's direction:** {entry.section.claim}. Here: {_badge(overall(checks), as_html)}.",
            "",
            *[f"- {claim}: {_badge(status, as_html)}; {numbers}" for claim, status, numbers in checks],
            "",
            _images(body(entry), entry.path.parent, out, embed),
            "",
        ]
    runs = convergence.section(convergence.scan(root))
    if runs:
        toc.insert(2, "| Runs | [Did every training run converge?](#convergence) | see the section |")
        parts = ['<a id="convergence"></a>', "", "## Runs: did every training run converge?", "", runs, ""] + parts
    first = crossover.sections(figures or {}, root, embed)
    if first:
        toc.insert(2, "| Crossover | [From what training length does CopRA pay?](#crossover) | see the figure |")
        parts = first + parts
    found = f"{len(entries)} experiment {'summary' if len(entries) == 1 else 'summaries'} under `{root}`."
    head = [
        "# CopRA vs LoRA: the paper's experiments, run here",
        "",
        f"{found} Each section shows the experiment's own tables and figure, its seeds, key config and wall "
        "time, and whether the paper's direction (CopRA vs LoRA) held here.",
        "",
        f"**Rules.** {RULES}",
        "",
        "## Contents",
        "",
        *toc,
        "",
    ]
    return "\n".join(head + parts)


CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1080px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2.4em; }
h3 { font-size: 1.05em; }
.scroll { overflow-x: auto; margin: .8em 0; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d0d0; padding: 3px 9px; text-align: left; white-space: nowrap; }
thead th { background: #f2f2f2; } tbody tr:nth-child(even) { background: #fafafa; }
img { display: block; max-width: 100%; max-height: 560px; height: auto; margin: 1em auto; }
.meta { color: #555; font-size: 13px; margin: .3em 0; }
.v { padding: 0 .45em; border-radius: 3px; font-weight: 600; white-space: nowrap; }
.held { background: #d8f0d8; color: #14532d; } .reversed { background: #f9d7d7; color: #7f1d1d; }
.partly-held, .partly-reversed, .mixed { background: #fcebc4; color: #6b4500; }
.no-difference-shown, .not-measured, .protocol-step { background: #e6e6e6; color: #444; }
code { background: #f2f2f2; padding: 0 .2em; border-radius: 3px; }
"""


def to_html(text: str, images: dict[str, str], page_title: str) -> str:
    """Markdown -> one self-contained page: inline CSS, images as data URIs, wide tables scroll."""
    import markdown

    page = markdown.markdown(text, extensions=["tables"], output_format="html")
    page = page.replace("<table>", '<div class="scroll"><table>').replace("</table>", "</table></div>")
    for token, uri in images.items():
        page = page.replace(f'src="{token}"', f'src="{uri}"')
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(page_title)}'
        f"</title>\n<style>{CSS}</style>\n</head>\n<body>\n{page}\n</body>\n</html>\n"
    )


def build_report(results_dir: str | Path, output_dir: str | Path | None = None) -> tuple[str, str]:
    """(Markdown, HTML) of every experiment summary under `results_dir`; Markdown links relative to output_dir."""
    root = Path(results_dir)
    entries = find_summaries(root)
    out = Path(output_dir) if output_dir is not None else root
    return _build(root, out, entries)[:2]


def _build(root: Path, out: Path, entries: list[Entry]) -> tuple[str, str, dict[str, bytes]]:
    figures = crossover.figures([(e.path, e.summary) for e in entries if e.name in ("sweep", "multitask")])
    images: dict[str, str] = {}
    page = to_html(document(entries, root, out, images, figures), images, f"CopRA vs LoRA: {root}")
    return document(entries, root, out, None, figures), page, {name: f[3] for name, f in figures.items()}


def write_report(results_dir: str | Path, output: str | Path | None = None) -> tuple[Path, ...]:
    """Write paper_report.md and paper_report.html (and the crossover PNG) into `output` (default: `results_dir`)."""
    out = Path(output) if output is not None else Path(results_dir)
    with folder_lock(out):  # not while a suite or another report writes there
        markdown_text, page, figures = _build(Path(results_dir), out, find_summaries(results_dir))
        paths = tuple(out / name for name in OUTPUTS)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name, image in figures.items():  # before the Markdown that links them
                write_bytes(out / name, image)
            for path, text in zip(paths, (markdown_text, page)):
                write_text(path, text)
        except OSError as error:
            raise resource_error(error, out, "cannot write the report into") or UserError(
                f"cannot write the report into {out}: {error.strerror or error}"
            ) from None
    return paths
