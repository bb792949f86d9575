"""Streaming glue between checkpoint readers/writers and the engine's `merge_leaves`.

`MergeSources` opens the reference checkpoint (the base) and the merged models lazily, checks before any
tensor is read that every model has every tensor of the reference with the same shape, and provides the
engine's callbacks: `get_base(i)` / `get_model(t, i)` read one tensor (checked for NaN/Inf, optionally
sparsified per model), `put(i, array)` hands a merged tensor to the writer. Only the tensors of the chunk
being merged are in memory; the writer flushes shard by shard.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from drm_jax.cli import naming
from drm_jax.cli.config import MergeConfig, ModelEntry
from drm_jax.cli.recipe import PreSparsify, Recipe
from drm_jax.engine import roles as roles_lib
from drm_jax.errors import CheckpointError, DrmJaxError, MergeInputError

PEFT_CONFIG_NAME = "adapter_config.json"


def is_floating(dtype) -> bool:
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def dtype_kind(dtype) -> str:
    """"float" for every floating dtype (bfloat16 included), else numpy's kind letter: "i", "u", "b", "c"."""
    return "float" if is_floating(dtype) else np.dtype(dtype).kind


def split_adapter(config: MergeConfig, reference: str) -> tuple[Path, Path | None]:
    """mergekit's `model+adapter` reference -> (model path, adapter path or None).

    A `+` only separates an adapter when the whole string is not itself an existing path.
    """
    whole = config.resolve(reference)
    if whole.exists() or "+" not in reference:
        return whole, None
    model, adapter = reference.rsplit("+", 1)
    return config.resolve(model), config.resolve(adapter)


def open_model(config: MergeConfig, entry: ModelEntry, base_path: Path | None):
    """Open one model lazily: any format the readers know, or a PEFT adapter over a model.

    A PEFT adapter directory given alone is applied over the base model.
    """
    from drm_jax.io.detect import open_checkpoint

    path, adapter = split_adapter(config, entry.model)
    for p, what in ((path, "model"), (adapter, "adapter")):
        if p is not None and not p.exists():
            raise CheckpointError(f"{entry.key}: {what} path {str(p)!r} does not exist")
    if adapter is not None:
        return _open(lambda: open_checkpoint(adapter, base=path), entry, adapter)
    if path.is_dir() and (path / PEFT_CONFIG_NAME).is_file():
        if base_path is None:
            raise CheckpointError(f"{entry.key}: {str(path)!r} is a PEFT adapter and there is no base_model to "
                                  f"apply it to")
        return _open(lambda: open_checkpoint(path, base=base_path), entry, path)
    return _open(lambda: open_checkpoint(path), entry, path)


def _open(opener: Callable[[], Any], entry: ModelEntry, path: Path):
    try:
        reader = opener()
    except DrmJaxError:
        raise
    except Exception as err:  # a reader that did not wrap its own failure
        raise CheckpointError(f"{entry.key}: cannot open {str(path)!r}: {err}") from None
    return AdapterOverBase(reader) if getattr(reader, "format", None) == "peft" else reader


class AdapterOverBase:
    """A PEFT adapter seen as a whole model: adapted weights (base + scaling B A) where the adapter has
    them, the base's own tensors everywhere else."""

    format = "peft"  # Hugging Face names

    def __init__(self, adapter: Any):
        self.adapter = adapter
        self.base = adapter.base
        self.path = adapter.path
        self.config_dir = self.base.config_dir
        self._adapted = set(adapter.keys())

    def keys(self) -> list[str]:
        return list(self.base.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.base.shape(name))

    def dtype(self, name: str):
        return self.base.dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self.adapter.get(name) if name in self._adapted else self.base.get(name)

    def close(self) -> None:
        self.adapter.close()


def magnitude_trim(delta: np.ndarray, density: float) -> np.ndarray:
    """mergekit's `magnitude` sparsification mask: the max(1, floor(density n)) largest |delta| survive.

    Entries tied with the smallest survivor survive too (mergekit breaks such ties by sort order).
    """
    n = delta.size
    if density >= 1.0:
        return np.ones(delta.shape, bool)
    if density <= 0.0 or n == 0:
        return np.zeros(delta.shape, bool)
    k = max(1, int(density * n))
    magnitudes = np.abs(delta)
    threshold = np.partition(magnitudes.reshape(-1), n - k)[n - k]  # partition works on a copy
    return np.greater_equal(magnitudes, threshold, out=np.empty(delta.shape, bool))


def random_keep(seed: int, name: str, task: int, shape: tuple[int, ...], density: float) -> np.ndarray:
    """DARE's Bernoulli keep-mask for one model's tensor, seeded by (seed, tensor name, model index)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()) & 0x7FFFFFFF, task])
    return rng.random(shape) < density


@dataclass
class LeafInfo:
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[np.dtype]


class MergeSources:
    """The readers of one merge and the engine callbacks over them.

    Args:
      config: the checked config (paths are resolved with `config.resolve`).
      recipe: what to merge and how (`drm_jax.cli.recipe.build_recipe`).
      out_dtype: numpy dtype floating outputs are cast to, or None to keep the reference's dtypes.
    """

    def __init__(self, config: MergeConfig, recipe: Recipe, out_dtype: np.dtype | None = None):
        self.config = config
        self.recipe = recipe
        self.out_dtype = out_dtype
        self.readers: list[Any] = []
        self.reference = None
        self.models: list[Any] = []
        self.labels: list[str] = []
        self._cache: dict[tuple[Any, int], np.ndarray] = {}
        self.parts: list[tuple[int, int | None, int | None]] = []
        self._parts_left: dict[int, int] = {}
        self.info: LeafInfo | None = None
        self.roles: list[str] = []
        self.arch = "generic"

    # -- opening and checking ------------------------------------------------------------------------
    def open(self) -> "MergeSources":
        base_path = None
        if self.config.base_model is not None:
            base_path, _ = split_adapter(self.config, self.config.base_model)
        try:
            for entry in (self.recipe.reference, *self.recipe.models):
                self.readers.append(open_model(self.config, entry, base_path))
            # One convention for all: Hugging Face names and layout (mixed formats merge together).
            self.arch = naming.architecture_of(self.readers)
            self.readers = [naming.HFView(r, self.arch) for r in self.readers]
        except BaseException:
            self.close()
            raise
        self.reference, self.models = self.readers[0], self.readers[1:]
        self.labels = [f"{entry.key} ({entry.model})" for entry in self.recipe.models]
        self.info = self._check_tensors()
        return self

    def _check_tensors(self) -> LeafInfo:
        """Every merged tensor of the reference is in every model, with the reference's shape, and every
        tensor a model shares with the reference has the reference's kind of dtype (floating, signed or
        unsigned integer, bool; float precisions may differ). A reference without tensors is refused."""
        ref = self.reference
        names = list(ref.keys())
        if not names:
            raise CheckpointError(f"{self._reference_label()}: the reference model has no tensors "
                                  f"(empty or corrupt checkpoint)")
        shapes = [tuple(ref.shape(n)) for n in names]
        dtypes = [np.dtype(ref.dtype(n)) for n in names]
        rules = roles_lib.RoleRules(
            include=self.recipe.engine_kwargs.get("include"),
            exclude=self.recipe.engine_kwargs.get("exclude", roles_lib.DEFAULT_EXCLUDE),
            ignore=self.recipe.engine_kwargs.get("ignore"),
        )
        self.roles = [rules(n, s, d).role for n, s, d in zip(names, shapes, dtypes)]
        for name, shape, role in zip(names, shapes, self.roles):
            if role not in ("keep", "ignore") and 0 in shape:
                # The methods' reductions (max, SVD) have no value on zero elements.
                raise MergeInputError(f"tensor {name!r} has no elements (shape {shape}) in the "
                                      f"{self._reference_label()}; an empty tensor cannot be merged")
        for label, model in zip(self.labels, self.models):
            present = set(model.keys())
            for name, shape, dtype, role in zip(names, shapes, dtypes, self.roles):
                if name in present and dtype_kind(model.dtype(name)) != dtype_kind(dtype):
                    # Same byte size, other kind: merging would treat the bits as numbers of another kind.
                    raise MergeInputError(
                        f"tensor {name!r} has dtype {np.dtype(model.dtype(name)).name} in {label} but "
                        f"{dtype.name} in the {self._reference_label()}")
                if role in ("keep", "ignore"):
                    continue  # read from the reference only
                if name not in present:
                    raise MergeInputError(f"tensor {name!r} is missing from {label}")
                other = tuple(model.shape(name))
                if other != shape:
                    raise MergeInputError(
                        f"tensor {name!r} has shape {other} in {label} but {shape} in the "
                        f"{self.recipe.reference.key} ({self.recipe.reference.model})")
        return LeafInfo(names, shapes, dtypes)

    def close(self) -> None:
        for reader in self.readers:
            try:
                reader.close()
            except Exception:  # closing is best effort; the merge result is already decided
                pass
        self.readers = []

    def __enter__(self) -> "MergeSources":
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- engine callbacks ----------------------------------------------------------------------------
    def _read(self, reader, label: str, name: str) -> np.ndarray:
        try:
            array = np.asarray(reader.get(name))
        except DrmJaxError:
            raise
        except Exception as err:
            raise CheckpointError(f"{label}: cannot read tensor {name!r}: {err}") from None
        if is_floating(array.dtype) and not np.all(np.isfinite(array)):
            raise MergeInputError(f"tensor {name!r} of {label} contains NaN or Inf")
        return array

    def _reference_label(self) -> str:
        return f"{self.recipe.reference.key} ({self.recipe.reference.model})"

    def plan_blocks(self, num_models: int, budget_bytes: int | None) -> LeafInfo:
        """The leaves handed to the engine: each tensor whole, or in row blocks where its merge is elementwise
        (`Recipe.elementwise_roles`) and one layer of it, stacked over the base and the K models in float32,
        would exceed `budget_bytes` (the engine cannot cut below one leaf). Same result, bounded memory."""
        info = self.info
        self.parts = []
        for i, (shape, role) in enumerate(zip(info.shapes, self.roles)):
            row_bytes = (num_models + 1) * 4 * int(np.prod(shape[1:], dtype=np.int64))
            rows = shape[0] if shape else 0
            if (budget_bytes is None or role not in self.recipe.elementwise_roles or len(shape) == 0
                    or rows * row_bytes <= budget_bytes):
                self.parts.append((i, None, None))
                continue
            step = max(1, budget_bytes // max(1, row_bytes))
            self.parts += [(i, start, min(rows, start + step)) for start in range(0, rows, step)]
        self._parts_left = {}
        for i, start, _ in self.parts:
            self._parts_left[i] = self._parts_left.get(i, 0) + 1
        names = [info.names[i] for i, _, _ in self.parts]
        shapes = [info.shapes[i] if a is None else (b - a,) + tuple(info.shapes[i][1:]) for i, a, b in self.parts]
        dtypes = [info.dtypes[i] for i, _, _ in self.parts]
        return LeafInfo(names, shapes, dtypes)

    def batches(self) -> list[list[int]]:
        """Part indices in engine calls: every whole tensor in the first call, then one call per tensor cut
        into blocks (so its cached inputs are released before the next one is read)."""
        whole = [j for j, (_, start, _) in enumerate(self.parts) if start is None]
        split: dict[int, list[int]] = {}
        for j, (i, start, _) in enumerate(self.parts):
            if start is not None:
                split.setdefault(i, []).append(j)
        return ([whole] if whole else []) + list(split.values())

    # Full tensors are cached while their parts are merged: the base always (the engine holds it for the
    # chunk anyway; a per-model trim needs it again), a model's tensor only when it is cut into blocks.
    def _full_base(self, i: int) -> np.ndarray:
        if self.recipe.zero_base and self.roles[i] in ("linear", "other"):
            # mergekit's linear averages full weights: merge against zeros.
            return np.zeros(self.info.shapes[i], self.info.dtypes[i])
        key = ("base", i)
        if key not in self._cache:
            self._cache[key] = self._read(self.reference, self._reference_label(), self.info.names[i])
        return self._cache[key]

    def _full_model(self, t: int, i: int) -> np.ndarray:
        key = (t, i)
        if key in self._cache:
            return self._cache[key]
        array = self._read(self.models[t], self.labels[t], self.info.names[i])
        pre = self.recipe.pre_sparsify[t] if self.recipe.pre_sparsify else None
        if pre is not None:
            array = self._pre_sparsify(pre, t, i, array)
        if self._parts_left.get(i, 1) > 1:
            self._cache[key] = array
        return array

    def _part(self, j: int, full: np.ndarray) -> np.ndarray:
        _, start, stop = self.parts[j]
        return full if start is None else full[start:stop]

    def get_base(self, j: int) -> np.ndarray:
        """Engine callback: part j of the base (the reference model)."""
        return self._part(j, self._full_base(self.parts[j][0]))

    def get_model(self, t: int, j: int) -> np.ndarray:
        """Engine callback: part j of model t (checked for NaN/Inf, sparsified per model if asked)."""
        return self._part(j, self._full_model(t, self.parts[j][0]))

    def _pre_sparsify(self, pre: PreSparsify, t: int, i: int, model: np.ndarray) -> np.ndarray:
        base = self._full_base(i)
        wide = np.float64 if model.dtype == np.float64 else np.float32
        delta = np.subtract(model, base, dtype=wide)
        if pre.kind == "magnitude":
            keep = magnitude_trim(delta, pre.density)
            del delta
            # Surviving entries keep the model's own value, so the engine's delta is exactly the original.
            return np.where(keep, model, base)
        seed = int(self.recipe.engine_kwargs.get("seed", 0))
        keep = random_keep(seed, self.info.names[i], t, delta.shape, pre.density)
        factor = 1.0 / pre.density if pre.rescale and pre.density > 0 else 1.0
        dropped = np.where(keep, delta * factor, 0.0).astype(wide)
        return (base.astype(wide) + dropped).astype(model.dtype)

    def make_put(self, add: Callable[[str, np.ndarray], None]) -> Callable[[int, Any], None]:
        """put(j, array) for the engine: cast floating tensors to the output dtype, reassemble row blocks,
        hand each finished tensor to `add` and drop its cached inputs."""
        assembling: dict[int, np.ndarray] = {}

        def put(j: int, array: Any) -> None:
            i, start, stop = self.parts[j]
            out = np.asarray(array)
            if self.out_dtype is not None and is_floating(out.dtype) and out.dtype != self.out_dtype:
                with np.errstate(over="ignore"):  # an overflow is refused just below, in one line
                    out = out.astype(self.out_dtype)
            if is_floating(out.dtype) and not np.all(np.isfinite(out)):
                # Finite inputs can still overflow (large weights, or a cast to a narrower dtype).
                raise MergeInputError(f"merged tensor {self.info.names[i]!r} contains Inf or NaN (the merge "
                                      f"overflowed {out.dtype.name}); nothing was written")
            if start is not None:
                if i not in assembling:
                    assembling[i] = np.empty(self.info.shapes[i], out.dtype)
                assembling[i][start:stop] = out
            self._parts_left[i] -= 1
            if self._parts_left[i] == 0:
                add(self.info.names[i], assembling.pop(i) if start is not None else out)
                for key in [k for k in self._cache if k[1] == i]:
                    del self._cache[key]

        return put

    def merged_count(self) -> int:
        """Engine leaves (tensors or row blocks) that go through a merge path: the progress bar's total."""
        return sum(self.roles[i] in ("linear", "other") for i, _, _ in self.parts)

    def counts(self) -> dict[str, int]:
        """Tensors per engine path (linear, other, ignore, keep)."""
        counts = {"linear": 0, "other": 0, "ignore": 0, "keep": 0}
        for role in self.roles:
            counts[role] += 1
        return counts


def input_paths(config: MergeConfig, models: Sequence[ModelEntry]) -> list[Path]:
    """Every filesystem path a merge reads (models, adapters, the base, the tokenizer source)."""
    refs = [m.model for m in models]
    if config.base_model is not None:
        refs.append(config.base_model)
    if config.tokenizer_source not in (None, "base"):
        refs.append(config.tokenizer_source)
    paths = []
    for ref in refs:
        model, adapter = split_adapter(config, ref)
        paths += [model] + ([adapter] if adapter is not None else [])
    return paths


__all__ = ["MergeSources", "dtype_kind", "input_paths", "is_floating", "magnitude_trim", "open_model", "random_keep",
           "split_adapter"]
