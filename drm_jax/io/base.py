"""The reader interface every checkpoint format implements, and the one byte-exact read helper.

A reader lists tensor names and their shapes and dtypes from the checkpoint's metadata alone, and
`get(name)` reads only that tensor's bytes. So a merge or a conversion holds one tensor at a time, never a
whole model: checkpoints larger than memory are fine.
"""

from __future__ import annotations

import abc
import io
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from drm_jax.errors import CheckpointError

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


def has_config_files(directory: Path) -> bool:
    """Whether `directory` holds a config.json or a tokenizer/processor file worth copying."""
    return any((directory / name).is_file() for name in CONFIG_FILE_NAMES)


def config_dir(*candidates: Path) -> Path | None:
    """The first of `candidates` holding config or tokenizer files (`CheckpointReader.config_dir`), else None."""
    return next((d for d in candidates if has_config_files(d)), None)


def open_binary(path: Path) -> io.RawIOBase:
    """An unbuffered binary file: every read is exactly the bytes asked for (no read-ahead)."""
    try:
        return open(path, "rb", buffering=0)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot open: {err.strerror or err}") from err


def read_exact(handle: io.RawIOBase, offset: int, nbytes: int, *, path: Path, what: str) -> np.ndarray:
    """Read `nbytes` bytes at `offset` into a fresh uint8 array; raises CheckpointError on a short read.

    `what` names the tensor for the message. Reads straight into the array (no intermediate bytes copy).
    """
    buffer = np.empty(nbytes, dtype=np.uint8)
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
    try:
        return os.stat(path).st_size
    except OSError as err:
        raise CheckpointError(f"{path}: cannot stat: {err.strerror or err}") from err


class CheckpointReader(abc.ABC):
    """Lazy, read-only view of one checkpoint: names, shapes, dtypes, and one tensor at a time.

    Attributes:
      format: "hf" | "torch" | "flax" | "orbax" | "t5x" | "peft".
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
        return CheckpointError(f"{self.path}: no tensor named {name!r}")


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
