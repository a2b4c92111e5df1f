"""The user's own data as a task: CSV/TSV, JSON Lines, Parquet through `datasets`; one-line errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from copra.core.config import make_config
from copra.data.user_files import load_file_task, text_task
from copra.utils.errors import UserError

pytest.importorskip("datasets", reason="reading data files needs Hugging Face datasets (pip install datasets)")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "reviews.csv"
CLASSES = ("cats", "dogs", "fish")
ROWS = [(f"a story number {i} about {c}", c) for c in CLASSES for i in range(6)]


def write(path: Path, rows=ROWS, columns=("text", "label")) -> Path:
    """`rows` as a CSV/TSV, JSON Lines or Parquet file, chosen by the suffix."""
    records = [dict(zip(columns, r)) for r in rows]
    if path.suffix in (".csv", ".tsv"):
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writerow(columns)
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_each_format_gives_the_same_task(tmp_path, suffix):
    task = load_file_task(str(write(tmp_path / f"data{suffix}")))
    assert task.class_names == CLASSES and task.name == f"file:{tmp_path / f'data{suffix}'}"
    assert Counter(task.train_labels) == {0: 4, 1: 4, 2: 4} and Counter(task.test_labels) == {0: 2, 1: 2, 2: 2}
    assert not set(task.train_texts) & set(task.test_texts)
    assert task.prompts()[1] == "This text is about dogs."
    again = load_file_task(str(write(tmp_path / f"again{suffix}")))
    assert again.test_texts == task.test_texts  # the split depends on the texts, not the file


def test_columns_prompt_and_numeric_labels(tmp_path):
    rows = [(f"review {i} with {y} stars", str(y)) for y in (10, 2, 1) for i in range(3)]
    path = write(tmp_path / "n.jsonl", [(t, int(y)) for t, y in rows], columns=("body", "stars"))
    task = load_file_task(str(path), text_column="body", label_column="stars", prompt="A {}-star review.")
    assert task.class_names == ("1", "2", "10")  # numbers in numeric order
    assert task.prompts() == ["A 1-star review.", "A 2-star review.", "A 10-star review."]


def test_train_and_test_files_keep_the_users_split(tmp_path):
    train = write(tmp_path / "train.csv")
    test = write(
        tmp_path / "test.csv",
        [("a new cat story", "cats"), ("a new dog story", "dogs"), ("a new fish story", "fish"), (ROWS[0][0], "cats")],
    )
    task = load_file_task(str(train), str(test))
    assert len(task.train_texts) == 18 and task.test_texts == (
        "a new cat story",
        "a new dog story",
        "a new fish story",
    )


def test_built_in_task_with_prompt():
    task = text_task("bbc_news", prompt="News about {}.")
    assert task.prompts()[0] == "News about business." and len(task.train_texts) > 1000


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_column", "has no column 'text'; its columns are: body, label"),
        ("empty_class_in_test", "class 'fish' (id 2) has only 0 examples"),
        ("test_class_not_in_train", "class 'birds' has no examples in"),
        ("empty_label", "row 2 has an empty 'label'"),
        ("non_utf8", "is not UTF-8 text (byte 0xe9 at offset"),
        ("one_class", "holds 1 class(es); need at least 2"),
        ("class_of_one", "class 'fish' (id 2) has only 1 examples"),
        ("unknown_type", "unknown file type '.txt'"),
        ("missing_file", "data file not found"),
        ("same_columns", "text_column and label_column are both 'label'"),
        ("broken_json", "cannot read"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, case, message):
    args: dict = {}
    if case == "missing_column":
        path = write(tmp_path / "d.csv", columns=("body", "label"))
    elif case in ("empty_class_in_test", "test_class_not_in_train"):
        path = write(tmp_path / "d.csv")
        other = "birds" if case == "test_class_not_in_train" else "dogs"
        args["test_file"] = str(write(tmp_path / "t.csv", [("x cats", "cats"), ("x other", other)]))
    elif case == "empty_label":
        path = write(tmp_path / "d.csv", [("one", "cats"), ("two", "")] + ROWS)
    elif case == "non_utf8":
        path = tmp_path / "d.csv"
        path.write_bytes("text,label\ncaf\xe9 au lait,cats\n".encode("latin-1"))
    elif case == "one_class":
        path = write(tmp_path / "d.csv", [r for r in ROWS if r[1] == "cats"])
    elif case == "class_of_one":
        path = write(tmp_path / "d.csv", [r for r in ROWS if r[1] != "fish"] + [("one fish", "fish")])
    elif case == "unknown_type":
        path = tmp_path / "d.txt"
        path.write_text("x")
    elif case == "missing_file":
        path = tmp_path / "nope.csv"
    elif case == "same_columns":
        path, args = write(tmp_path / "d.csv"), dict(text_column="label")
    else:
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "a", "label": "x"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(UserError) as error:
        load_file_task(str(path), **args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_train_file_and_its_rules(tmp_path):
    path = str(write(tmp_path / "d.csv"))
    config = make_config(dict(train_file=path))
    assert config.task == f"file:{path}"
    assert make_config(dict(task=f"file:{path}", train_file=path)).task == f"file:{path}"
    for values, message in (
        (dict(task="file:other.csv", train_file=path), "name two files"),
        (dict(test_file=path), "test_file needs a training file"),
        (dict(prompt="no slot"), "exactly one {}"),
        (dict(train_file=path, backbone="clip"), "data files are text tasks"),
        (dict(train_file=path, text_column=" "), "text_column must not be empty"),
    ):
        with pytest.raises(UserError, match=message):
            make_config(values)


def test_too_few_examples_for_the_shots(tmp_path):
    from copra.models.evaluation import prepare_data

    config = make_config(dict(task=f"file:{write(tmp_path / 'd.csv')}", shots=5))
    with pytest.raises(UserError, match="class 'cats' has only 4 training examples, fewer than shots=5"):
        prepare_data(config)
    data = prepare_data(config.replace(shots=4, seed=1))
    assert Counter(data.train_y) == {0: 4, 1: 4, 2: 4} and len(data.eval_y) == 6


def test_shipped_example():
    task = load_file_task(str(EXAMPLE), text_column="review", label_column="topic")
    assert task.class_names == ("battery", "delivery", "screen")
    assert min(Counter(task.train_labels).values()) >= 16  # the default 16 shots fit


def test_cli_trains_on_a_csv(capsys, tmp_path, tiny_text_model):
    from copra.cli import main

    out = tmp_path / "run"
    argv = [
        "train",
        "--set",
        f"task=file:{EXAMPLE}",
        "--set",
        "text_column=review",
        "--set",
        "label_column=topic",
        "--set",
        "prompt=This review is about the {}.",
        "--set",
        f"model={tiny_text_model}",
        "--set",
        "shots=2",
        "--set",
        "steps=2",
        "--set",
        "batch_size=4",
        "--set",
        "max_length=16",
        "--set",
        "progress=false",
        "--set",
        f"output_dir={out}",
    ]
    assert main(argv) == 0
    assert f"on file:{EXAMPLE}" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    code = main(argv[:-2] + ["--set", f"output_dir={tmp_path / 'bad'}", "--set", "label_column=stars"])
    err = capsys.readouterr().err
    assert code == 2 and "has no column 'stars'" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
