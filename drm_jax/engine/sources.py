"""The on-disk side of the merge planner: checked checkpoint readers as the planner's source, and the
sink that hands merged tensors to a writer.

`CheckpointSources` takes readers that are already open (the command line opens them with `drm_jax.io`;
nothing here reads a file format), checks before any tensor is read that every model has every merged
tensor of the reference with the same shape and the same kind of dtype, and gives the planner its
callbacks: `get_base(j)` / `get_model(t, j)` read one tensor (or one row block of a tensor whose merge is
elementwise and too large for the memory budget), checked for NaN/Inf; `make_put(add)` casts, checks the
merged tensor, reassembles blocks and hands each finished tensor to the sink. `stream_merge` runs the
whole merge through `drm_jax.engine.merge.merge_leaves`: only the tensors of the chunk being merged are
in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from drm_jax.engine import roles as roles_lib
from drm_jax.engine.merge import merge_leaves
from drm_jax.errors import CheckpointError, DrmJaxError, MergeInputError


def is_floating(dtype) -> bool:
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def dtype_kind(dtype) -> str:
    """"float" for every floating dtype (bfloat16 included), else numpy's kind letter: "i", "u", "b", "c"."""
    return "float" if is_floating(dtype) else np.dtype(dtype).kind


@dataclass
class LeafInfo:
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[np.dtype]


class CheckpointSources:
    """Open readers of one merge and the planner's callbacks over them.

    Args:
      reference: the reader whose names, shapes and dtypes the output takes (the base model).
      models: the merged models' readers, in order. labels: how errors name them.
      reference_label: how errors name the reference.
      role_kwargs: include / exclude / ignore patterns (and layout) of `drm_jax.engine.roles.RoleRules`.
      zero_base: merge against a zero base (mergekit's `linear` averages full weights).
      exact_roles: roles whose merge is elementwise, so a tensor may be merged in row blocks.
      out_dtype: numpy dtype floating outputs are cast to, or None to keep the reference's dtypes.
    """

    def __init__(self, reference, models: Sequence[Any], labels: Sequence[str], reference_label: str, *,
                 role_kwargs: dict, zero_base: bool = False, exact_roles: frozenset = frozenset(),
                 out_dtype: np.dtype | None = None):
        self.reference, self.models, self.labels = reference, list(models), list(labels)
        self.reference_label, self.role_kwargs = reference_label, dict(role_kwargs)
        self.zero_base, self.exact_roles, self.out_dtype = zero_base, frozenset(exact_roles), out_dtype
        self._cache: dict[tuple[Any, int], np.ndarray] = {}
        self.parts: list[tuple[int, int | None, int | None]] = []
        self._parts_left: dict[int, int] = {}
        self.roles: list[str] = []
        self.info = self._check_tensors()

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
        rules = roles_lib.RoleRules(**self.role_kwargs)
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
                        f"{self._reference_label()}")
        return LeafInfo(names, shapes, dtypes)

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
        return self.reference_label

    def plan_blocks(self, num_models: int, budget_bytes: int | None) -> LeafInfo:
        """The leaves handed to the engine: each tensor whole, or in row blocks where its merge is elementwise
        (`Rules.exact_if_blocked`) and one layer of it, stacked over the base and the K models in float32,
        would exceed `budget_bytes` (the engine cannot cut below one leaf). Same result, bounded memory."""
        info = self.info
        self.parts = []
        for i, (shape, role) in enumerate(zip(info.shapes, self.roles)):
            row_bytes = (num_models + 1) * 4 * int(np.prod(shape[1:], dtype=np.int64))
            rows = shape[0] if shape else 0
            if (budget_bytes is None or role not in self.exact_roles or len(shape) == 0
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
    # chunk anyway), a model's tensor only when it is cut into blocks.
    def _full_base(self, i: int) -> np.ndarray:
        if self.zero_base and self.roles[i] in ("linear", "other"):
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
        """Engine callback: part j of model t (checked for NaN/Inf)."""
        return self._part(j, self._full_model(t, self.parts[j][0]))

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


def stream_merge(sources: CheckpointSources, add: Callable[[str, np.ndarray], None], *, method: str, params: dict,
                 layout, mesh=None, max_group_bytes: int | None, block_bytes: int | None,
                 on_chunk=None) -> dict[str, int]:
    """Merge every tensor of `sources` into the sink `add(name, array)`, streaming (see the module doc)."""
    leaves = sources.plan_blocks(len(sources.models), block_bytes)
    put = sources.make_put(add)
    for batch in sources.batches():
        merge_leaves(
            [leaves.names[j] for j in batch], [leaves.shapes[j] for j in batch], [leaves.dtypes[j] for j in batch],
            get_base=lambda k, b=batch: sources.get_base(b[k]),
            get_model=lambda t, k, b=batch: sources.get_model(t, b[k]),
            put=lambda k, array, b=batch: put(b[k], array),
            num_models=len(sources.models), method=method, layout=layout, mesh=mesh,
            max_group_bytes=max_group_bytes, on_chunk=on_chunk,
            include=sources.role_kwargs.get("include"),
            exclude=sources.role_kwargs.get("exclude", roles_lib.DEFAULT_EXCLUDE),
            ignore=sources.role_kwargs.get("ignore"), **params,
        )
    return sources.counts()


__all__ = ["CheckpointSources", "LeafInfo", "dtype_kind", "is_floating", "stream_merge"]
