"""The reader interface every checkpoint format implements, and the one byte-exact read helper.

A reader lists tensor names and their shapes and dtypes from the checkpoint's metadata alone, and
`get(name)` reads only that tensor's bytes. So a merge or a conversion holds one tensor at a time, never a
whole model: checkpoints larger than memory are fine.
"""

from __future__ import annotations

import abc
import io
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from drm_jax.buffers import aligned_empty
from drm_jax.errors import CheckpointError, quote

# File names copied next to converted weights: model config, generation config, tokenizer and processor.
CONFIG_FILE_NAMES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
)


def is_step_number(name: str) -> bool:
    """Whether a directory name is a training step: ASCII digits only ("²" and "٣" are digits to
    str.isdigit, and int() refuses the first)."""
    return name.isascii() and name.isdigit()


def step_order(name: str) -> tuple[int, str]:
    """Sort key of a step number in numeric order, without int() (which refuses 5,000 digits)."""
    digits = name.lstrip("0")
    return len(digits), digits


def has_config_files(directory: Path) -> bool:
    """Whether `directory` holds a config.json or a tokenizer/processor file worth copying."""
    return any((directory / name).is_file() for name in CONFIG_FILE_NAMES)


def config_dir(*candidates: Path) -> Path | None:
    """The first of `candidates` holding config or tokenizer files (`CheckpointReader.config_dir`), else None."""
    return next((d for d in candidates if has_config_files(d)), None)


def require_regular_file(path: Path) -> os.stat_result:
    """os.stat of `path` (links followed), refusing anything but a regular file.

    Checked before opening: opening a FIFO blocks until someone writes to it, and a device or socket named
    like a checkpoint is never one.
    """
    try:
        info = os.stat(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot stat: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else \
            "not a regular file"
        raise CheckpointError(f"{path}: {kind}, not a checkpoint file; refused")
    return info


def open_binary(path: Path) -> io.RawIOBase:
    """An unbuffered binary file: every read is exactly the bytes asked for (no read-ahead).

    Only regular files are opened (`require_regular_file`)."""
    require_regular_file(path)
    try:
        return open(path, "rb", buffering=0)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot open: {err.strerror or err}") from None


def parse_json(text: str | bytes, path: Path, what: str) -> Any:
    """json.loads with every failure (bad syntax, bad UTF-8, nesting too deep for the parser) as one
    CheckpointError naming `path` and `what` ("index", "adapter config", ...)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise CheckpointError(f"{path}: cannot read {what}: JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read {what}: {err}") from None


def read_json(path: Path, what: str) -> Any:
    """The JSON value in file `path` (a regular file only; see `parse_json` for the errors)."""
    require_regular_file(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read {what}: {err.strerror or err}") from None
    return parse_json(raw, path, what)


def json_object_or_none(path: Path) -> dict | None:
    """The JSON object in `path`, or None where it is missing, unreadable or not an object: for files an
    output copies as they are (its config.json), which are not ours to repair."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# A claimed array size is checked against the bytes on disk before anything is allocated: at most
# `ratio` times the stored bytes (the codec's best compression), or this floor for arrays left mostly to
# their fill value (zarr stores no chunk that equals it).
CLAIM_FLOOR_BYTES = 64 * 2**20


def check_claimed_size(path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, stored_bytes: int,
                       ratio: int) -> None:
    """Refuse tensor `name` when its header-claimed size cannot come from `stored_bytes` bytes on disk."""
    claimed = 1
    for d in shape:
        claimed *= int(d)
    claimed *= np.dtype(dtype).itemsize
    if claimed > max(CLAIM_FLOOR_BYTES, ratio * stored_bytes):
        raise CheckpointError(f"{path}: header lies about sizes: tensor {quote(name)} claims shape {tuple(shape)} "
                              f"({claimed} bytes) but only {stored_bytes} bytes are stored for it")


def tree_bytes(directory: Path, root: Path) -> int:
    """Bytes of the regular files under `directory`, refusing a FIFO, device or socket among them and a
    symbolic link whose target is outside `root` (a checkpoint reads only its own files)."""
    total = 0
    root = Path(root).resolve()
    for folder, dirs, files in os.walk(directory):
        for name in dirs + files:
            entry = Path(folder) / name
            if entry.is_symlink():
                target = entry.resolve()
                if target != root and root not in target.parents:
                    raise CheckpointError(f"{entry}: symbolic link to {str(target)!r}, outside the checkpoint "
                                          f"directory {str(root)!r}; refused")
                if target.is_dir():
                    raise CheckpointError(f"{entry}: symbolic link to a directory inside a checkpoint; refused")
        for name in files:
            total += require_regular_file(Path(folder) / name).st_size
    return total


def read_exact(handle: io.RawIOBase, offset: int, nbytes: int, *, path: Path, what: str) -> np.ndarray:
    """Read `nbytes` bytes at `offset` into a fresh uint8 array; raises CheckpointError on a short read.

    `what` names the tensor for the message. Reads straight into the array (no intermediate bytes copy),
    64-byte aligned: JAX's CPU backend then reads the tensor in place instead of copying it
    (`drm_jax.buffers`).
    """
    buffer = aligned_empty(nbytes)
    view = memoryview(buffer)
    handle.seek(offset)
    filled = 0
    while filled < nbytes:
        count = handle.readinto(view[filled:])
        if not count:
            raise CheckpointError(
                f"{path}: truncated: {what} needs bytes {offset}..{offset + nbytes} but the file ends at "
                f"{offset + filled}"
            )
        filled += count
    return buffer


def file_size(path: Path) -> int:
    """Size in bytes of regular file `path` (anything else is refused, see `require_regular_file`)."""
    return require_regular_file(path).st_size


class CheckpointReader(abc.ABC):
    """Lazy, read-only view of one checkpoint: names, shapes, dtypes, and one tensor at a time.

    Attributes:
      format: "hf" | "torch" | "flax" | "orbax" | "t5x" | "peft" | "maxtext".
      path: the checkpoint as given (file or directory).
      config_dir: the directory holding config.json / tokenizer files to copy with converted weights, or
        None when there are none.
    Names are the checkpoint's own, dotted ("encoder.layer.0.attention.self.query.weight" for Hugging Face,
    "encoder.layer.0.attention.self.query.kernel" for Flax, "target.encoder.layers_0....kernel" for T5X).
    """

    format: str = ""

    def __init__(self, path: Path, config_dir: Path | None) -> None:
        self.path = Path(path)
        self.config_dir = config_dir

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Tensor names, in the checkpoint's order."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`, from metadata (no tensor bytes read)."""

    @abc.abstractmethod
    def dtype(self, name: str) -> np.dtype:
        """numpy dtype of tensor `name` (bf16 as ml_dtypes.bfloat16), from metadata."""

    @abc.abstractmethod
    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a fresh numpy array, reading only its bytes."""

    def close(self) -> None:
        """Release open files. Idempotent."""

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) pairs, one tensor in memory at a time."""
        for name in self.keys():
            yield name, self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in set(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} format={self.format!r} path={str(self.path)!r} tensors={len(self)}>"

    def _unknown(self, name: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: no tensor named {quote(name)}")


class IndexedReader(CheckpointReader):
    """A reader that lists its tensors in one dict, `self._by_name`: name -> the format's record of it.

    The names, membership and the unknown-name error all come from that dict, in its (the checkpoint's)
    order; `_record(name)` is the lookup every accessor goes through.
    """

    _by_name: dict[str, Any]

    def keys(self) -> list[str]:
        return list(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def _record(self, name: str) -> Any:
        if name not in self._by_name:
            raise self._unknown(name)
        return self._by_name[name]
