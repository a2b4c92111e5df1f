"""The user's own labelled text as a task: a local CSV/TSV, JSON Lines or Parquet file, or a pair.

Why: the built-in tasks show CopRA on fixed data; this lets anyone train on theirs with the same
few-shot sampling and evaluation. Files are read with Hugging Face ``datasets``' local-file readers
(``Dataset.from_csv`` / ``from_json`` / ``from_parquet``: no hub, a throwaway cache folder), then go
through the same cleaning as the built-in tasks (`copra.data.sources`). One file is split ~70/30 per
class by text hash, as the built-in tasks without a split; a ``test_file`` keeps the user's split.
Class names are the label values (numbers in numeric order, otherwise sorted) and fill ``prompt``,
default ``"This text is about {}."``. Every mistake a user can make in the file is one UserError line.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from copra.data.sources import TextTask, build_presplit, build_split
from copra.utils.errors import UserError

FILE_PREFIX = "file:"
DEFAULT_PROMPT = "This text is about {}."
FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MIN_PER_CLASS = 2  # a single file needs one train and one test example per class


def _format(path: Path) -> str:
    if path.suffix.lower() not in FORMATS:
        raise UserError(
            f"{path}: unknown file type {path.suffix or '(none)'!r}; use one of "
            f"{', '.join(FORMATS)} (CSV, JSON Lines, Parquet)"
        )
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    return FORMATS[path.suffix.lower()]


def _check_utf8(path: Path) -> None:
    """A clear error for a text file in another encoding (pandas/arrow would fail deep inside)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{path} is not UTF-8 text (byte 0x{chunk[err.start]:02x} at offset "
                    f"{offset + err.start}); save it as UTF-8"
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (it ends inside a character); save it as UTF-8") from None


def read_columns(path: str | Path, columns: tuple[str, str]) -> dict[str, list[Any]]:
    """The named columns of a local data file, read with `datasets`; UserError for any problem."""
    path = Path(path)
    kind = _format(path)
    if kind != "parquet":
        _check_utf8(path)
    try:
        import datasets
    except ImportError:
        raise UserError("reading your own data files needs Hugging Face datasets: pip install datasets") from None
    reader = {
        "csv": datasets.Dataset.from_csv,
        "json": datasets.Dataset.from_json,
        "parquet": datasets.Dataset.from_parquet,
    }[kind]
    options = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    progress = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="copra-data-") as cache:
            table = reader(str(path), cache_dir=cache, keep_in_memory=True, **options)
    except Exception as err:  # datasets wraps pandas/arrow parse errors of every kind; report the cause
        cause = err.__cause__ or err
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise UserError(f"cannot read {path} as {kind}: {first}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not progress:
            datasets.enable_progress_bars()
    for column in columns:
        if column not in table.column_names:
            raise UserError(f"{path} has no column {column!r}; its columns are: {', '.join(table.column_names)}")
    return {column: table[column] for column in columns}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def _rows(path: str, text_column: str, label_column: str) -> list[tuple[str, str]]:
    data = read_columns(path, (text_column, label_column))
    rows = []
    for i, (text, label) in enumerate(zip(data[text_column], data[label_column])):
        if _missing(label):
            raise UserError(f"{path}: row {i + 1} has an empty {label_column!r} (every text needs a label)")
        rows.append(("" if _missing(text) else str(text), _label_name(label)))
    if not rows:
        raise UserError(f"{path} holds no rows")
    return rows


def _label_name(label: Any) -> str:
    if isinstance(label, float) and label.is_integer():
        return str(int(label))  # pandas reads an int column with a gap as floats
    return str(label).strip()


def _class_order(names: set[str]) -> list[str]:
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def load_file_task(
    train_file: str,
    test_file: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    prompt: str | None = None,
) -> TextTask:
    """A TextTask from local files; cached per (files, their size and mtime, columns, prompt)."""
    if text_column == label_column:
        raise UserError(f"text_column and label_column are both {text_column!r}; they must differ")
    stamps = tuple(
        (os.path.getsize(p), os.path.getmtime(p)) if os.path.isfile(p) else None for p in (train_file, test_file) if p
    )
    return _load(train_file, test_file, text_column, label_column, prompt or DEFAULT_PROMPT, stamps)


@functools.lru_cache(maxsize=16)
def _load(
    train_file: str, test_file: str | None, text_column: str, label_column: str, prompt: str, _stamps: tuple
) -> TextTask:
    train = _rows(train_file, text_column, label_column)
    test = _rows(test_file, text_column, label_column) if test_file else []
    classes = _class_order({y for _, y in train})
    unseen = sorted({y for _, y in test} - set(classes))
    if unseen:
        raise UserError(f"{test_file}: class {unseen[0]!r} has no examples in {train_file} (an empty class)")
    index = {y: i for i, y in enumerate(classes)}
    name = f"{FILE_PREFIX}{train_file}"
    if len(classes) < 2:
        raise UserError(f"{train_file}: column {label_column!r} holds {len(classes)} class(es); need at least 2")
    if test_file:
        task = build_presplit(
            name,
            tuple(classes),
            prompt,
            f"{train_file} + {test_file}",
            [(t, index[y]) for t, y in train],
            [(t, index[y]) for t, y in test],
            minimum=1,
        )
    else:
        task = build_split(
            name,
            tuple(classes),
            prompt,
            str(train_file),
            [(t, index[y]) for t, y in train],
            minimum=MIN_PER_CLASS,
            salt="file",
        )
    return task


def text_task(
    task: str,
    test_file: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    prompt: str | None = None,
) -> TextTask:
    """The text task a run names: built-in, or ``file:PATH``; ``prompt`` replaces a built-in's template."""
    if task.startswith(FILE_PREFIX):
        path = task[len(FILE_PREFIX) :].strip()
        if not path:
            raise UserError(f"task {task!r} names no file; write task=file:PATH")
        return load_file_task(path, test_file, text_column, label_column, prompt)
    if test_file:
        raise UserError(f"test_file needs a file task (task=file:PATH or train_file=PATH), not task={task!r}")
    from copra.data.text_tasks import load_task

    built = load_task(task)
    return dataclasses.replace(built, template=prompt) if prompt else built
