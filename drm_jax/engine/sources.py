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

Slabs: where every merged tensor's merge is elementwise and the same for both roles (linear, task
arithmetic), the tensors are laid end to end, per dtype signature, and cut into 1-D slabs of one size;
the engine merges slab after slab with ONE compiled program instead of one per tensor shape (a cold
`drm-jax merge` of a Llama-shaped model compiled 10 merge programs, most of its startup), and the sink
cuts the merged slabs back into tensors. A tensor that fills a slab by itself is passed as a view of
the read array, without a copy. Results are those of the per-tensor merge, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from drm_jax.engine import roles as roles_lib
from drm_jax.engine.merge import merge_leaves
from drm_jax.errors import CheckpointError, DrmJaxError, MergeInputError, quote
from drm_jax.numbers import is_floating


def dtype_kind(dtype) -> str:
    """"float" for every floating dtype (bfloat16 included), else numpy's kind letter: "i", "u", "b", "c"."""
    return "float" if is_floating(dtype) else np.dtype(dtype).kind


@dataclass
class LeafInfo:
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[np.dtype]


@dataclass(frozen=True)
class Slab:
    """Flat pieces of elementwise-merged tensors laid end to end in one 1-D leaf of `size` elements (zero
    padded). segments: (tensor index, start, stop in the tensor's flat view, offset in the slab)."""

    segments: tuple[tuple[int, int, int, int], ...]
    size: int
    dtypes: tuple[str, ...] = ()  # the inputs' dtypes: the base's, then each model's

    @property
    def whole_view(self) -> bool:
        """One segment filling the slab: the slab is a view of that tensor's flat array."""
        return len(self.segments) == 1 and self.segments[0][3] == 0 and \
            self.segments[0][2] - self.segments[0][1] == self.size


class _Tail:
    """The cached remainder of a tensor whose whole slabs are merged: its flat elements from `start`."""

    def __init__(self, start: int, array: np.ndarray):
        self.start, self.array, self.dtype = start, array, array.dtype

    def piece(self, a: int, b: int) -> np.ndarray:
        return self.array[a - self.start:b - self.start]


# Elements per slab: large enough that a call streams at memory speed, small enough for the budget.
SLAB_MAX = 1 << 19
SLAB_MIN = 1 << 12
SLAB_ALIGN = 1 << 10
SLABS_PER_CALL = 8


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
        # Slabs merge every piece as a 1-D leaf of the "other" path: the linear role joins only where its
        # merge is elementwise too (then both roles run the same elementwise rule: linear, task arithmetic).
        self.slab_roles = frozenset({"other"} & self.exact_roles) | (
            frozenset({"matrix"}) if {"matrix", "other"} <= self.exact_roles else frozenset())
        self.parts: list = []  # (i, start, stop): tensor i, or its rows start:stop; or a Slab
        self.finished = 0  # tensors handed to the sink
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
            if role not in ("not_floating", "ignore") and 0 in shape:
                # The methods' reductions (max, SVD) have no value on zero elements.
                raise MergeInputError(f"tensor {quote(name)} has no elements (shape {shape}) in the "
                                      f"{self._reference_label()}; an empty tensor cannot be merged")
        for label, model in zip(self.labels, self.models):
            present = set(model.keys())
            for name, shape, dtype, role in zip(names, shapes, dtypes, self.roles):
                if name in present and dtype_kind(model.dtype(name)) != dtype_kind(dtype):
                    # Same byte size, other kind: merging would treat the bits as numbers of another kind.
                    raise MergeInputError(
                        f"tensor {quote(name)} has dtype {np.dtype(model.dtype(name)).name} in {label} but "
                        f"{dtype.name} in the {self._reference_label()}")
                if role in ("not_floating", "ignore"):
                    continue  # read from the reference only
                if name not in present:
                    raise MergeInputError(f"tensor {quote(name)} is missing from {label}")
                other = tuple(model.shape(name))
                if other != shape:
                    raise MergeInputError(
                        f"tensor {quote(name)} has shape {other} in {label} but {shape} in the "
                        f"{self._reference_label()}")
        return LeafInfo(names, shapes, dtypes)

    def _read(self, reader, label: str, name: str) -> np.ndarray:
        try:
            array = np.asarray(reader.get(name))
        except DrmJaxError:
            raise
        except Exception as err:
            raise CheckpointError(f"{label}: cannot read tensor {quote(name)}: {err}") from None
        if is_floating(array.dtype) and not np.all(np.isfinite(array)):
            raise MergeInputError(f"tensor {quote(name)} of {label} contains NaN or Inf")
        return array

    def _reference_label(self) -> str:
        return self.reference_label

    def plan_blocks(self, num_models: int, budget_bytes: int | None,
                    slab_key: Callable[[str], Hashable] | None = None) -> LeafInfo:
        """The leaves handed to the engine: slabs (module docstring) for the tensors of `slab_roles`, and
        each other tensor whole, or in row blocks where its merge is elementwise (`Rules.row_separable`)
        and one layer of it, stacked over the base and the K models in float32, would exceed
        `budget_bytes` (the engine cannot cut below one leaf). Same result, bounded memory.

        slab_key(name): tensors share slabs only where it agrees (their per-tensor parameters)."""
        info = self.info
        self.parts = []
        slabbed: dict[Hashable, list[int]] = {}
        for i, (shape, role) in enumerate(zip(info.shapes, self.roles)):
            if role in self.slab_roles:
                key = (self._dtype_signature(i), None if slab_key is None else slab_key(info.names[i]))
                slabbed.setdefault(key, []).append(i)
                continue
            row_bytes = (num_models + 1) * 4 * int(np.prod(shape[1:], dtype=np.int64))
            rows = shape[0] if shape else 0
            if (budget_bytes is None or role not in self.exact_roles or len(shape) == 0
                    or rows * row_bytes <= budget_bytes):
                self.parts.append((i, None, None))
                continue
            step = max(1, budget_bytes // max(1, row_bytes))
            self.parts += [(i, start, min(rows, start + step)) for start in range(0, rows, step)]
        for (dtypes, _), members in slabbed.items():
            self.parts += self._slabs(members, num_models, budget_bytes, dtypes)
        self._parts_left, self._views_left, self._tail_start = {}, {}, {}
        for part in self.parts:
            for i in self._tensors_of(part):
                self._parts_left[i] = self._parts_left.get(i, 0) + 1
            if isinstance(part, Slab) and part.whole_view:
                i = part.segments[0][0]
                self._views_left[i] = self._views_left.get(i, 0) + 1
            elif isinstance(part, Slab):
                for i, a, _, _ in part.segments:
                    self._tail_start[i] = min(a, self._tail_start.get(i, a))
        names, shapes, dtypes = [], [], []
        for part in self.parts:
            if isinstance(part, Slab):
                if part.segments:
                    first = info.names[part.segments[0][0]]
                    more = len(part.segments) - 1
                    names.append(first if not more else f"{first} (and {more} more tensors in its slab)")
                else:
                    names.append(f"<padding slab {len(names)}>")
                shapes.append((part.size,))
                # computed in float32 (float64 for float64 tensors); the sink casts each piece to its dtype
                dtypes.append(np.promote_types(np.float32, np.dtype(part.dtypes[0])))
            else:
                i, a, b = part
                names.append(info.names[i])
                shapes.append(info.shapes[i] if a is None else (b - a,) + tuple(info.shapes[i][1:]))
                dtype = info.dtypes[i]
                if self.out_dtype is not None and is_floating(dtype):
                    # as for slabs: the sink rounds once, to out_dtype, not to the reference's dtype first
                    dtype = np.promote_types(np.float32, dtype)
                dtypes.append(dtype)
        return LeafInfo(names, shapes, dtypes)

    def _dtype_signature(self, i: int) -> tuple[str, ...]:
        name = self.info.names[i]
        return (self.info.dtypes[i].name,) + tuple(np.dtype(m.dtype(name)).name for m in self.models)

    @staticmethod
    def _tensors_of(part) -> list[int]:
        return [seg[0] for seg in part.segments] if isinstance(part, Slab) else [part[0]]

    def _slabs(self, members: list[int], num_models: int, budget_bytes: int | None,
               dtypes: tuple[str, ...]) -> list[Slab]:
        """The tensors `members` cut into slabs of one size: each tensor's whole slabs first (views, no
        copy), its remainder packed with the next tensors' remainders into a slab emitted as soon as it is
        full (so a tensor's read arrays are released a few tensors later); then empty slabs to a multiple
        of SLABS_PER_CALL, so every call of the group has the same shape."""
        sizes = [int(np.prod(self.info.shapes[i], dtype=np.int64)) for i in members]
        size = SLAB_MAX
        if budget_bytes is not None:
            size = min(size, max(SLAB_MIN, budget_bytes // ((num_models + 2) * 4 * SLABS_PER_CALL)))
        size = min(size, 1 << max(0, max(sizes) - 1).bit_length())  # small models: no large padding
        # a power of two: the usual widths divide it, so most tensors are whole slabs with no remainder
        size = max(SLAB_ALIGN, 1 << (size.bit_length() - 1))
        slabs: list[Slab] = []
        packing: list[tuple[int, int, int, int]] = []
        filled = 0
        for i, n in zip(members, sizes):
            whole = n // size
            slabs += [Slab(((i, q * size, (q + 1) * size, 0),), size, dtypes) for q in range(whole)]
            start = whole * size
            while start < n:
                take = min(n - start, size - filled)
                packing.append((i, start, start + take, filled))
                start, filled = start + take, filled + take
                if filled == size:
                    slabs.append(Slab(tuple(packing), size, dtypes))
                    packing, filled = [], 0
        if packing:
            slabs.append(Slab(tuple(packing), size, dtypes))
        slabs += [Slab((), size, dtypes)] * (-len(slabs) % SLABS_PER_CALL)
        return slabs

    def batches(self) -> list[list[int]]:
        """Part indices in engine calls: every whole tensor in the first call, then one call per tensor cut
        into blocks (so its cached inputs are released before the next one is read); the slabs last, in
        calls of their own, one per slab size and dtypes (`slab_batch`)."""
        whole = [j for j, p in enumerate(self.parts) if not isinstance(p, Slab) and p[1] is None]
        split: dict[int, list[int]] = {}
        for j, p in enumerate(self.parts):
            if not isinstance(p, Slab) and p[1] is not None:
                split.setdefault(p[0], []).append(j)
        slabs: dict[tuple, list[int]] = {}
        for j, p in enumerate(self.parts):
            if isinstance(p, Slab):
                slabs.setdefault((p.size, p.dtypes), []).append(j)
        return ([whole] if whole else []) + list(split.values()) + list(slabs.values())

    def slab_batch(self, batch: list[int]) -> bool:
        return bool(batch) and isinstance(self.parts[batch[0]], Slab)

    # Full tensors are cached while their parts are merged: the base always (the engine holds it for the
    # chunk anyway), a model's tensor only when it is cut into blocks.
    def _full_base(self, i: int) -> np.ndarray:
        if self.zero_base and self.roles[i] in ("matrix", "other"):
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

    def _part(self, j: int, full: Callable[[int], np.ndarray], which: int) -> np.ndarray:
        part = self.parts[j]
        if isinstance(part, Slab):
            if part.whole_view:
                i, a, b, _ = part.segments[0]
                return full(i).reshape(-1)[a:b]
            if not part.segments:  # padding of the last call
                return np.zeros(part.size, np.dtype(part.dtypes[which]))
            slab = np.zeros(part.size, np.dtype(part.dtypes[which]))
            for i, a, b, offset in part.segments:
                source = full(i)
                slab[offset:offset + b - a] = source.piece(a, b) if isinstance(source, _Tail) else \
                    source.reshape(-1)[a:b]
            return slab
        i, start, stop = part
        return full(i) if start is None else full(i)[start:stop]

    def get_base(self, j: int) -> np.ndarray:
        """Engine callback: part j of the base (the reference model)."""
        return self._part(j, self._full_base, 0)

    def get_model(self, t: int, j: int) -> np.ndarray:
        """Engine callback: part j of model t (checked for NaN/Inf)."""
        return self._part(j, lambda i: self._full_model(t, i), t + 1)

    def make_put(self, add: Callable[[str, np.ndarray], None]) -> Callable[[int, Any], None]:
        """put(j, array) for the engine: cast floating tensors to the output dtype, reassemble row blocks and
        slabs, hand each finished tensor to `add` and drop its cached inputs."""
        assembling: dict[int, np.ndarray] = {}

        def cast_checked(i: int, out: np.ndarray, dtype) -> np.ndarray:
            if dtype is not None and is_floating(out.dtype) and out.dtype != dtype:
                with np.errstate(over="ignore"):  # an overflow is refused just below, in one line
                    out = out.astype(dtype)
            if is_floating(out.dtype) and not np.all(np.isfinite(out)):
                # Finite inputs can still overflow (large weights, or a cast to a narrower dtype).
                raise MergeInputError(f"merged tensor {self.info.names[i]!r} contains Inf or NaN (the merge "
                                      f"overflowed {out.dtype.name}); nothing was written")
            return out

        def finish(i: int, out: np.ndarray) -> None:
            self._parts_left[i] -= 1
            if self._parts_left[i] == 0:
                add(self.info.names[i], assembling.pop(i) if i in assembling else out)
                self.finished += 1
                for key in [k for k in self._cache if k[1] == i]:
                    del self._cache[key]

        def put(j: int, array: Any) -> None:
            part = self.parts[j]
            merged = np.asarray(array)
            if isinstance(part, Slab):
                if part.whole_view:
                    self._keep_tail(part.segments[0][0])
                for i, a, b, offset in part.segments:
                    dtype = self.out_dtype if self.out_dtype is not None else self.info.dtypes[i]
                    piece = cast_checked(i, merged[offset:offset + b - a], dtype)
                    shape = self.info.shapes[i]
                    if a == 0 and b == int(np.prod(shape, dtype=np.int64)):
                        finish(i, piece.reshape(shape))  # the whole tensor: a view of the merged slab
                        continue
                    if i not in assembling:
                        assembling[i] = np.empty(shape, piece.dtype)
                    assembling[i].reshape(-1)[a:b] = piece
                    finish(i, assembling[i])
                return
            i, start, stop = part
            out = cast_checked(i, merged, self.out_dtype)
            if start is not None:
                if i not in assembling:
                    assembling[i] = np.empty(self.info.shapes[i], out.dtype)
                assembling[i][start:stop] = out
            finish(i, out)

        return put

    def _keep_tail(self, i: int) -> None:
        """After the last whole slab of tensor i, only its remainder (packed with other tensors' into a
        later slab) is still to be read: the cached arrays are cut down to a copy of it."""
        self._views_left[i] -= 1
        if self._views_left[i] or i not in self._tail_start:
            return
        start = self._tail_start[i]
        for key in [k for k in self._cache if k[1] == i]:
            if not isinstance(self._cache[key], _Tail):
                self._cache[key] = _Tail(start, self._cache[key].reshape(-1)[start:].copy())

    def merged_count(self) -> int:
        """Engine leaves (tensors or row blocks) that go through a merge path: the progress bar's total
        (a slabbed tensor counts once, when it is finished)."""
        slabbed = sum(self.roles[i] in self.slab_roles for i in range(len(self.roles)))
        return slabbed + sum(self.roles[p[0]] in ("matrix", "other") for p in self.parts if not isinstance(p, Slab))

    def counts(self) -> dict[str, int]:
        """Tensors per engine path (linear, other, ignore, keep)."""
        counts = {"matrix": 0, "other": 0, "ignore": 0, "not_floating": 0}
        for role in self.roles:
            counts[role] += 1
        return counts


def stream_merge(sources: CheckpointSources, add: Callable[[str, np.ndarray], None], *, method: str, params: dict,
                 layout, mesh=None, max_group_bytes: int | None, block_bytes: int | None,
                 on_chunk=None, leaf_params: dict[str, dict] | None = None) -> dict[str, int]:
    """Merge every tensor of `sources` into the sink `add(name, array)`, streaming (see the module doc).

    leaf_params: {tensor name: {traced parameter: value}} (per-tensor values); tensors share a slab only
    where theirs agree, and the slab takes them."""
    def params_of(name: str) -> dict:
        return dict((leaf_params or {}).get(name) or {})

    def slab_key(name: str):
        return tuple(sorted((k, repr(v)) for k, v in params_of(name).items()))

    leaves = sources.plan_blocks(len(sources.models), block_bytes, slab_key=slab_key if leaf_params else None)
    put = sources.make_put(add)
    for batch in sources.batches():
        names = [leaves.names[j] for j in batch]
        if sources.slab_batch(batch):
            # SLABS_PER_CALL slabs per call: every call runs the same compiled program; the real tensors'
            # names carry the patterns and parameters (slabs are merged as 1-D leaves of the other path)
            batch_params = {n: params_of(sources.info.names[sources.parts[j].segments[0][0]])
                            for n, j in zip(names, batch) if sources.parts[j].segments}
            roles = {"include": None, "exclude": None, "ignore": None}
            size = sources.parts[batch[0]].size
            batch_bytes = SLABS_PER_CALL * size * 4 * (len(sources.models) + 1)
            report = _slab_progress(sources, on_chunk)
            extra_checks = {"check_finite": False}  # the sink checks each tensor's piece, naming it
        else:
            batch_params = {n: params_of(n) for n in names}
            roles = {"include": sources.role_kwargs.get("include"),
                     "exclude": sources.role_kwargs.get("exclude", roles_lib.DEFAULT_EXCLUDE),
                     "ignore": sources.role_kwargs.get("ignore")}
            batch_bytes, report, extra_checks = max_group_bytes, on_chunk, {}
        extra = {"leaf_params": {n: v for n, v in batch_params.items() if v}} if leaf_params else {}
        extra.update(extra_checks)
        merge_leaves(
            names, [leaves.shapes[j] for j in batch], [leaves.dtypes[j] for j in batch],
            get_base=lambda k, b=batch: sources.get_base(b[k]),
            get_model=lambda t, k, b=batch: sources.get_model(t, b[k]),
            put=lambda k, array, b=batch: put(b[k], array),
            num_models=len(sources.models), method=method, layout=layout, mesh=mesh,
            max_group_bytes=batch_bytes, on_chunk=report, **roles, **extra, **params,
        )
    return sources.counts()


def _slab_progress(sources: CheckpointSources, on_chunk):
    """on_chunk for slabs: reports the tensors each slab finished (the progress bar counts tensors)."""
    if on_chunk is None:
        return None
    done = [sources.finished]

    def report(group, _n):
        if sources.finished > done[0]:
            on_chunk(group, sources.finished - done[0])
            done[0] = sources.finished

    return report


__all__ = ["CheckpointSources", "Slab", "stream_merge"]
