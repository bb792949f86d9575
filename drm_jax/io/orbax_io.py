"""Orbax checkpoints (a PyTree of arrays saved by `orbax.checkpoint`), in Flax naming.

Accepted paths: the item directory itself (it holds `_METADATA` / `manifest.ocdbt`), a step directory
with one item subdirectory (CheckpointManager's `step/default`), or a CheckpointManager root of numbered
step directories (the latest step is read). Shapes and dtypes come from Orbax's metadata; `get` restores
just one array with a partial restore, so nothing else is read. Writing saves the nested dict of arrays
with `PyTreeCheckpointer` (OCDBT + zarr, as Orbax does by default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from drm_jax.errors import CheckpointError
from drm_jax.io.base import IndexedReader, check_claimed_size, config_dir, is_step_number, step_order, tree_bytes
from drm_jax.io.dtypes import as_numpy_dtype
from drm_jax.io.nested import unflatten_names

# zstd (Orbax's OCDBT codec) on constant data reaches ratios in the tens of thousands.
_MAX_EXPANSION = 2**15


def is_orbax_item(directory: Path) -> bool:
    return directory.is_dir() and any((directory / marker).exists() for marker in ("_METADATA", "manifest.ocdbt"))


def find_orbax_item(path: Path) -> Path | None:
    """The Orbax item directory at or under `path` (see module docstring), or None."""
    if is_orbax_item(path):
        return path
    if not path.is_dir():
        return None
    items = [child for child in path.iterdir() if is_orbax_item(child)]
    if len(items) == 1:
        return items[0]
    steps = sorted((child for child in path.iterdir() if child.is_dir() and is_step_number(child.name)),
                   key=lambda child: step_order(child.name))
    for step in reversed(steps):
        item = find_orbax_item(step)
        if item is not None:
            return item
    return None


@contextlib.contextmanager
def _quiet_absl(threshold: int = logging.ERROR):
    """Orbax logs its own warnings through absl on failures we report ourselves in one line (and, from its
    writing threads, each failure with a traceback at ERROR level before handing it to us)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(threshold)
    try:
        yield
    finally:
        logger.setLevel(level)


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer()


def _flatten_metadata(tree: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        flat: dict[tuple[str, ...], Any] = {}
        for key, value in tree.items():
            flat.update(_flatten_metadata(value, (*path, str(key))))
        return flat
    if isinstance(tree, (list, tuple)):
        flat = {}
        for index, value in enumerate(tree):
            flat.update(_flatten_metadata(value, (*path, str(index))))
        return flat
    return {path: tree} if getattr(tree, "shape", None) is not None else {}


def restore_template(tree: Any, path: tuple[str, ...], wanted: Any, skip: Any) -> Any:
    """A restore template of the checkpoint's own containers: `wanted` at `path`, `skip` at every other leaf.

    Built from the metadata tree, so a list or tuple (Optax state: `opt_state` is a list of named tuples,
    stored as lists and dicts) is a list of the same length, never the dict a path of keys would suggest;
    Orbax refuses a template whose container types or lengths differ from the tree's. Empty states (None)
    stay None. Only the containers on `path` are copied; the rest of the template is `skip` leaves.
    """
    def fill(node: Any, rest: tuple[str, ...] | None) -> Any:
        if isinstance(node, dict):
            return {key: fill(value, rest[1:] if rest and str(key) == rest[0] else None) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return [fill(value, rest[1:] if rest and str(i) == rest[0] else None) for i, value in enumerate(node)]
        if node is None:
            return None
        return wanted if rest == () else skip

    return fill(tree, tuple(path))


class OrbaxReader(IndexedReader):
    """An Orbax PyTree checkpoint of arrays; names are the tree paths joined by "."."""

    format = "orbax"

    def __init__(self, path: Path) -> None:
        path = Path(path)
        item = find_orbax_item(path)
        if item is None:
            raise CheckpointError(f"{path}: not an Orbax checkpoint (no _METADATA or manifest.ocdbt)")
        super().__init__(path, config_dir(item, path))
        self.item_dir = item
        # Orbax takes a relative path for a path of its own kind and finds no arrays there: it gets ours
        # absolute (errors still name the path as given).
        self._item_abs = item.absolute()
        self._checkpointer = _checkpointer()
        stored = tree_bytes(item, item)  # before Orbax reads a byte: every file is the item's own
        try:
            with _quiet_absl():
                metadata = self._checkpointer.metadata(self._item_abs)
        except Exception as err:  # orbax raises ValueError, FileNotFoundError, tensorstore errors, ...
            raise CheckpointError(f"{item}: cannot read Orbax metadata: {str(err)[:200]}") from None
        # orbax >= 0.11 wraps the tree as StepMetadata.item_metadata.tree; older versions return it bare.
        item_metadata = getattr(metadata, "item_metadata", metadata)
        tree = getattr(item_metadata, "tree", item_metadata)
        self._tree = tree
        flat = _flatten_metadata(tree)
        if not flat:
            raise CheckpointError(f"{item}: the Orbax metadata lists no arrays (corrupt or empty _METADATA)")
        self._by_name = {".".join(key): value for key, value in flat.items()}  # name -> array metadata
        self._paths = {".".join(key): key for key in flat}
        # Before any restore allocates: the metadata's sizes fit the stored bytes.
        for name in self._by_name:
            check_claimed_size(item, name, self.shape(name), self.dtype(name), stored, _MAX_EXPANSION)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._record(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return as_numpy_dtype(self._record(name).dtype)

    def get(self, name: str) -> np.ndarray:
        import orbax.checkpoint as ocp

        self._record(name)
        path = self._paths[name]
        item_root = restore_template(self._tree, path, 0, ocp.PLACEHOLDER)
        args_root = restore_template(self._tree, path, ocp.RestoreArgs(restore_type=np.ndarray), ocp.PLACEHOLDER)
        try:
            with _quiet_absl():
                restored = self._checkpointer.restore(
                    self._item_abs,
                    args=ocp.args.PyTreeRestore(item=item_root, restore_args=args_root))
        except Exception as err:
            raise CheckpointError(f"{self.item_dir}: cannot read tensor {name!r}: {err}") from err
        for key in path:
            restored = restored[int(key)] if isinstance(restored, (list, tuple)) else restored[key]
        array = np.asarray(restored)
        if array.shape != self.shape(name):
            raise CheckpointError(f"{self.item_dir}: tensor {name!r} has shape {array.shape}, metadata says {self.shape(name)}")
        return array


def _os_error(err: BaseException) -> OSError | None:
    """The system error behind a failed save: an OSError itself, or the one tensorstore reports inside a
    ValueError ("... No space left on device [os_error_code='28']"); None for any other failure."""
    if isinstance(err, OSError) and err.errno is not None:
        return OSError(err.errno, err.strerror or os.strerror(err.errno))
    match = re.search(r"os_error_code='?(\d+)", str(err))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


def _is_closed_loop_callback(unraisable: Any) -> bool:
    return (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
            and unraisable.object is None)


@contextlib.contextmanager
def _closed_loop_callbacks_dropped(quiet_s: float = 0.2, limit_s: float = 2.0):
    """Orbax closes its event loop at the first failed write while tensorstore still has writes of the same
    save in flight; each of them, failing in turn, calls back into the closed loop, and that RuntimeError
    reaches sys.unraisablehook as a traceback on stderr, possibly after the save has returned. Inside the
    block those are dropped; after a failure the block waits until none has come for `quiet_s` seconds
    (at most `limit_s`), so that none arrives once the previous hook is back."""
    previous = sys.unraisablehook
    last = [time.monotonic()]

    def hook(unraisable) -> None:
        if _is_closed_loop_callback(unraisable):
            last[0] = time.monotonic()
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        start = last[0] = time.monotonic()
        while time.monotonic() - last[0] < quiet_s and time.monotonic() - start < limit_s:
            time.sleep(0.02)
        raise
    finally:
        sys.unraisablehook = previous


def write_orbax(tensors: Mapping[str, np.ndarray], directory: Path, shown_as: Path | None = None) -> Path:
    """Save dotted-name tensors as a nested-dict Orbax PyTree checkpoint in `directory` (replaced).

    shown_as: the path errors name (default `directory`; a writer's temporary directory is named by its
    destination). A system error (a full disk, a file too large) is raised as an OSError without a file
    name, to be reported against that destination; any other failure as a CheckpointError.
    """
    tree = unflatten_names({name: np.asarray(array) for name, array in tensors.items()})
    # Orbax wants an absolute path and stages beside its target: save into a folder inside `directory`
    # (its staging folder lands inside too, and goes with it on failure), then move the files up.
    directory = Path(directory).absolute()
    item = directory / ".orbax-item"
    try:
        with _quiet_absl(logging.CRITICAL), _closed_loop_callbacks_dropped():
            _checkpointer().save(item, tree, force=True)
    except Exception as err:
        system = _os_error(err)
        if system is not None:
            raise system from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{shown_as or directory}: cannot write Orbax checkpoint: {first[:300]}") from None
    for child in item.iterdir():
        os.replace(child, directory / child.name)
    item.rmdir()
    return directory
