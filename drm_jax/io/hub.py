"""Models named by a Hugging Face Hub id (`org/name`, optionally `org/name@revision`), as mergekit names them.

`hub_snapshot` gives the local snapshot folder of such a model through `huggingface_hub` (a dependency of
transformers): from the local cache when it is there, else downloaded when the network is allowed
(HF_HUB_OFFLINE unset), else a CheckpointError of one line naming the id and what to do. The cache is the
one `huggingface_hub` uses (HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), or the folder
given (mergekit's `--transformers-cache`); both environment variables are read at each call, not when
`huggingface_hub` was first imported. Its files are links into the cache's blobs, which
`drm_jax.io.model_files.safe_model_file` accepts. Only weights (safetensors), JSON and tokenizer files are
downloaded: no repository code, no pickles.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from drm_jax.errors import CheckpointError, quote

try:  # installed with transformers; without it, only local paths name models
    import huggingface_hub
except ImportError:  # pragma: no cover - transformers' dependency
    huggingface_hub = None

# `org/name` in the Hub's characters, then an optional `@revision` (a branch, tag or commit).
HUB_ID = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@([A-Za-z0-9][A-Za-z0-9._/-]*))?")
# What a merge reads from a model repository (never its code or pickled weights).
DOWNLOADED = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_TRUE = ("1", "on", "yes", "true")


def split_hub_id(reference: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of an `org/name[@revision]` reference; None for anything else."""
    match = HUB_ID.fullmatch(reference)
    return None if match is None else (match.group(1), match.group(2))


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hub cache folder: `cache_dir`, else HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_snapshot(reference: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local snapshot folder of the Hub model `reference` (`org/name[@revision]`).

    Raises CheckpointError (one line naming the id and what to do) when the model is not in the cache and
    cannot be downloaded (offline, no network, no such repository).
    """
    parts = split_hub_id(reference)
    if parts is None:
        raise CheckpointError(f"{quote(reference)} is not a Hugging Face Hub id (org/name[@revision])")
    repo_id, revision = parts
    cache = hub_cache_dir(cache_dir)
    named = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    fetch = f"huggingface-cli download {repo_id}" + (f" --revision {revision}" if revision else "")
    if huggingface_hub is None:
        raise CheckpointError(f"{quote(reference)} does not exist here and names a Hugging Face model {named}, "
                              f"which needs the huggingface_hub package (pip install huggingface_hub), or give "
                              f"the model's local folder")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                                      local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError and kin): try the network below
        pass
    missing = f"{quote(reference)} does not exist here, and the Hugging Face model {named} is not in the cache " \
              f"{str(cache)!r}"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        raise CheckpointError(f"{missing} while HF_HUB_OFFLINE is set: download it where the network is allowed "
                              f"({fetch}) or give the model's local folder")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                                      allow_patterns=DOWNLOADED))
    except Exception as err:  # no network, no such repository, a gated one, a full disk
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(f"{missing} and could not be downloaded ({reason}): check the id "
                              f"and the network ({fetch}), or give the model's local folder") from None


__all__ = ["hub_cache_dir", "hub_snapshot", "split_hub_id"]
