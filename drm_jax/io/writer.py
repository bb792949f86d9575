"""Writing checkpoints atomically: Hugging Face safetensors (streamed, sharded), Flax msgpack, Orbax, T5X,
MaxText.

Everything is written into a temporary directory beside the destination, which is renamed into place by
`close()`; any failure (or `abort()`, or an exception inside `with`) removes it, so a half-written
checkpoint never appears. An existing non-empty destination is refused unless `overwrite=True`; then it
must be an earlier drm-jax output (`check_replaceable`: only names drm-jax writes), and it is replaced only
once the new checkpoint is complete. A destination that is a dangling symbolic link is refused up front
without `overwrite=True`.

Names are written as given: Hugging Face names for "hf", dotted Flax paths for "flax" and "orbax"
(nested on "."), "target.<path>" for "t5x", MaxText's presented names for "maxtext"
(drm_jax.io.maxtext_io). Conversion between conventions is drm_jax.io.convert's job.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Mapping

import numpy as np

from drm_jax.errors import CheckpointError, quote, quote_path
from drm_jax.io.base import CONFIG_FILE_NAMES
from drm_jax.io.flax_io import FLAX_NAME, write_flax_msgpack
from drm_jax.io.model_files import copy_model_files
from drm_jax.io.maxtext_io import MaxTextLayout, write_maxtext
from drm_jax.io.orbax_io import write_orbax
from drm_jax.io.safetensors_io import SafetensorsShardWriter
from drm_jax.io.t5x_io import T5xWriter

WRITE_FORMATS = ("hf", "flax", "orbax", "t5x", "maxtext")
DEFAULT_MAX_SHARD_SIZE = 5 * 2**30


def copy_config_files(source: Path | None, destination: Path) -> list[Path]:
    """Copy config.json, generation config, tokenizer and processor files from `source` (if any; each
    checked by `drm_jax.io.model_files.safe_model_file`)."""
    return copy_model_files(source, CONFIG_FILE_NAMES, destination)


# Writers whose temporary directory exists: the command line aborts them when it is interrupted, so a
# signal landing between a writer's creation and its `with` leaves nothing behind either.
_UNFINISHED: set["CheckpointWriter"] = set()


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM received inside the block are re-raised when it ends, so a directory created or
    renamed and our record of it never come apart (main thread only; elsewhere a no-op).

    Python-level: blocking the signals at the OS level would not do, since another thread (XLA's) then
    receives them and Python runs the handler in the main thread anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])  # now, to the handler that was in place before the block


def abort_unfinished() -> None:
    """Remove the temporary directories of every writer not yet closed (after an interrupt)."""
    for writer in list(_UNFINISHED):
        writer.abort()


def refuse_overlap(out_dir: str | Path, inputs, *, what: str = "output directory") -> None:
    """Raise CheckpointError when `out_dir` and any of `inputs` lie inside one another (or are one).

    Both are resolved with symbolic links followed, so a link cannot hide an input inside the output: an
    output that is, holds or sits inside an input would be written into or (with --force) deleted.
    """
    out = Path(out_dir).expanduser().resolve()
    for given in inputs:
        path = Path(given).expanduser().resolve()
        if out == path or out in path.parents or path in out.parents:
            raise CheckpointError(f"{what} {str(out_dir)!r} overlaps the input {str(given)!r}; inputs are never "
                                  f"written or removed, choose another output")


def umask_mode() -> int:
    """The mode a directory created now gets from the process umask (mkdtemp's 0700 ignores it)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def write_failure(out_dir: Path, err: BaseException) -> CheckpointError:
    """One line for an OSError (full disk, read-only or unwritable directory) while writing `out_dir`."""
    where = getattr(err, "filename", None) or out_dir
    return CheckpointError(f"{where}: cannot write: {getattr(err, 'strerror', None) or err}")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


# What a drm-jax output holds, top level: the weights of each format (safetensors shards and index, Flax
# msgpack, PEFT adapter, an Orbax item, a T5X checkpoint), the files copied beside them and the model card.
# Replacing an existing output (--force, overwrite=True) is allowed only where every entry is one of these
# and some weights are there: an unrelated directory is never deleted.
_OUTPUT_WEIGHTS = re.compile(r"model(?:-\d+-of-\d+)?\.safetensors|flax_model\.msgpack|adapter_model\.safetensors"
                             r"|_METADATA|_CHECKPOINT_METADATA|checkpoint")
_OUTPUT_FILES = re.compile(r"model\.safetensors\.index\.json|adapter_config\.json|README\.md|mergekit_config\.yml"
                           r"|commit_success\.txt|manifest\.ocdbt|_[A-Za-z_]+")
_OUTPUT_DIRS = re.compile(r"d|ocdbt\.process_\d+|array_metadatas|descriptor|target\..+")


# The model card drm-jax writes says so (drm_jax.config.card); another README.md is someone else's.
CARD_MARK = "made with drm-jax"


def _entry_is_ours(entry: Path) -> bool:
    name = entry.name
    if entry.is_dir() and not entry.is_symlink():
        return _OUTPUT_DIRS.fullmatch(name) is not None
    if name == "README.md":
        return _card_is_ours(entry)
    return (name in CONFIG_FILE_NAMES or _OUTPUT_WEIGHTS.fullmatch(name) is not None
            or _OUTPUT_FILES.fullmatch(name) is not None)


def _card_is_ours(path: Path) -> bool:
    try:
        if not path.is_file() or path.is_symlink():
            return False
        with open(path, "rb") as handle:
            return CARD_MARK.encode() in handle.read(2**20)
    except OSError:
        return False


def check_replaceable(out_dir: str | Path, option: str = "overwrite=True") -> None:
    """Refuse to replace `out_dir` unless it is empty, missing, or an earlier drm-jax output (only the
    names drm-jax writes, weights among them). `option` is how the caller's user asked for the
    replacement (`--force` on the command line), named in the message."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{quote_path(out_dir)}: exists and is not a directory; {option} only replaces an "
                              f"empty directory or an earlier drm-jax output")
    if not out.is_dir() or _is_empty_dir(out):
        return
    entries = sorted(out.iterdir())
    stranger = next((e for e in entries if not _entry_is_ours(e)), None)
    if stranger is None and not any(_OUTPUT_WEIGHTS.fullmatch(e.name) for e in entries):
        stranger = entries[0]
    if stranger is not None:
        raise CheckpointError(f"{quote_path(out_dir)}: holds {quote(stranger.name)}, which drm-jax did not write; "
                              f"{option} only replaces an empty directory or an earlier drm-jax output; remove it "
                              f"yourself or choose another output")


def check_dangling_link(out_dir: str | Path, option: str = "overwrite=True") -> None:
    """Refuse an output that is a symbolic link to nothing, unless `option` asks for it to be replaced."""
    out = Path(out_dir)
    if out.is_symlink() and not out.exists():
        raise CheckpointError(f"{quote_path(out_dir)}: a symbolic link to the missing {quote_path(os.readlink(out))}; "
                              f"pass {option} to replace the link, or choose another output")


class CheckpointWriter:
    """Writes one checkpoint into `out_dir`, atomically.

    Args:
      out_dir: destination directory (created, with missing parents, by `close()`).
      format: "hf" (safetensors), "flax" (flax_model.msgpack), "orbax" or "t5x".
      max_shard_size: bytes of tensor data per safetensors shard (default 5 GiB; "hf" only).
      overwrite: replace an existing non-empty `out_dir` that is an earlier drm-jax output (default: refuse
        with CheckpointError; an unrelated directory is refused either way).
      copy_from: directory whose config.json / tokenizer files are copied beside the weights.
      maxtext_layout: "maxtext" only: the stored tree to write (a `MaxTextReader.layout`: shapes, scanned
        or not); None: the arrays' own shapes, layers stacked when `scan_layers` (default True).

    "hf" and "t5x" stream: each tensor goes to disk as shards fill (hf) or at once (t5x). "flax" and "orbax"
    and "maxtext" hold the added arrays until `close()` (their files need the whole tree at once).
    """

    def __init__(self, out_dir: str | Path, format: str = "hf", *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 overwrite: bool = False, copy_from: str | Path | None = None,
                 maxtext_layout: MaxTextLayout | None = None, scan_layers: bool = True) -> None:
        if format not in WRITE_FORMATS:
            raise CheckpointError(f"cannot write format {format!r}; choose one of {', '.join(WRITE_FORMATS)}")
        self.out_dir = Path(out_dir)
        self.format = format
        self.overwrite = overwrite
        self.copy_from = Path(copy_from) if copy_from is not None else None
        self.maxtext_layout, self.scan_layers = maxtext_layout, scan_layers
        if self.out_dir.exists() and not overwrite and not _is_empty_dir(self.out_dir):
            raise CheckpointError(f"{quote_path(self.out_dir)}: exists and is not empty (pass overwrite=True to "
                                  f"replace it)")
        if overwrite:
            check_replaceable(self.out_dir)
        else:
            check_dangling_link(self.out_dir)
        self._created_parents: list[Path] = []
        self.tmp_dir = None
        with signals_deferred():
            try:
                self._created_parents = self._make_parents(self.out_dir.parent)
                self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
                _UNFINISHED.add(self)
                os.chmod(self.tmp_dir, umask_mode())  # becomes out_dir: the user's umask, not mkdtemp's 0700
            except OSError as err:
                self.abort()
                raise write_failure(self.out_dir.parent, err) from None
        self._names: set[str] = set()
        self._buffered: dict[str, np.ndarray] = {}
        self._shards = SafetensorsShardWriter(self.tmp_dir, max_shard_size) if format == "hf" else None
        self._t5x = T5xWriter(self.tmp_dir) if format == "t5x" else None
        self._closed = False

    @staticmethod
    def _make_parents(parent: Path) -> list[Path]:
        """Create missing parent directories; returns the ones created (removed again by abort())."""
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            directory.mkdir()
        return missing

    @property
    def path(self) -> Path:
        return self.out_dir

    def add(self, name: str, array) -> None:
        """Add tensor `name`; numpy (or JAX) arrays of any dtype, kept as they are (bf16 stays bf16)."""
        if self._closed:
            raise CheckpointError(f"{self.out_dir}: writer is closed")
        if name in self._names:
            raise CheckpointError(f"{self.out_dir}: tensor {quote(name)} added twice")
        array = np.asarray(array)
        if array.dtype.hasobject:
            raise CheckpointError(f"{self.out_dir}: tensor {quote(name)} has object dtype")
        self._names.add(name)
        try:
            if self._shards is not None:
                self._shards.add(name, array)
            elif self._t5x is not None:
                self._t5x.add(name, array)
            else:
                self._buffered[name] = array
        except OSError as err:
            if isinstance(err, CheckpointError):
                raise
            raise write_failure(self.out_dir, err) from None

    def _write_payload(self) -> None:
        if self._shards is not None:
            self._shards.finish()
        elif self._t5x is not None:
            self._t5x.finish()
        elif self.format == "flax":
            write_flax_msgpack(self._buffered, self.tmp_dir / FLAX_NAME)
        elif self.format == "maxtext":
            write_maxtext(self._buffered, self.tmp_dir, self.maxtext_layout, self.scan_layers)
        else:
            write_orbax(self._buffered, self.tmp_dir, shown_as=self.out_dir)
        self._buffered = {}

    def close(self) -> Path:
        """Finish the files, copy config files, and move the checkpoint into place; returns `out_dir`."""
        if self._closed:
            return self.out_dir
        try:
            self._write_payload()
            copy_config_files(self.copy_from, self.tmp_dir)
            self._move_into_place()
        except OSError as err:
            self.abort()
            if isinstance(err, CheckpointError):
                raise
            raise write_failure(self.out_dir, err) from None
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.out_dir

    def _move_into_place(self) -> None:
        with signals_deferred():  # an interrupt lands before the swap or after it, never inside
            self._swap_into_place()
            _UNFINISHED.discard(self)

    def _swap_into_place(self) -> None:
        backup = None
        if self.out_dir.exists() or self.out_dir.is_symlink():
            if _is_empty_dir(self.out_dir) and not self.out_dir.is_symlink():
                self.out_dir.rmdir()
            elif not self.overwrite:  # appeared while we were writing
                raise CheckpointError(f"{quote_path(self.out_dir)}: exists and is not empty (pass overwrite=True to "
                                      f"replace it)")
            else:
                check_replaceable(self.out_dir)  # it may have changed while we were writing
                backup = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}-{id(self)}"
                os.replace(self.out_dir, backup)
        try:
            os.replace(self.tmp_dir, self.out_dir)
        except BaseException:
            if backup is not None:
                os.replace(backup, self.out_dir)  # put the old checkpoint back
            raise
        if backup is not None:
            if backup.is_dir() and not backup.is_symlink():
                shutil.rmtree(backup, ignore_errors=True)
            else:
                backup.unlink()

    def abort(self) -> None:
        """Remove everything written so far (and parent directories this writer created)."""
        self._closed = True
        self._buffered = {}
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        _UNFINISHED.discard(self)
        for directory in self._created_parents:  # innermost first
            try:
                directory.rmdir()
            except OSError:
                break

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def write_checkpoint(tensors: Mapping[str, np.ndarray], out_dir: str | Path, format: str = "hf", **kwargs) -> Path:
    """Write a mapping of tensors as a checkpoint (see CheckpointWriter for the keyword arguments)."""
    with CheckpointWriter(out_dir, format, **kwargs) as writer:
        for name, array in tensors.items():
            writer.add(name, array)
    return writer.path
