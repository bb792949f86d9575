"""The executors: one per way of running a plan's chunks, behind one interface, chosen once per plan.

- `VmappedExecutor`: stacks a chunk's layers, runs the rule's `prepare` once (kept across a sweep when
  the plan stores it: DRM's decompositions) and a vmapped `merge` per call; a rule scaled last by a
  global number (`Rules.scaled_by`) keeps the unscaled merged delta, so a sweep over the scale alone is
  one elementwise pass.
- `FusedExecutor`: rules that prepare nothing (the elementwise family, TIES, DARE) run one fused program
  per chunk straight from the stored inputs; their deltas are never kept.
- `ShardedExecutor`: the layer axis split over a mesh's devices (`shard_map`, no collective); each
  process reads only the layers of its own devices.

`prepare_chunk(chunk)` returns what a chunk keeps between merges (a `Stored`, or None where the
executor prepares nothing); `merge_chunk(...)` returns a `Merged`: the leaves, by leaf index, and their
finite flags. Checking the flags and naming the leaf is the caller's (`engine/run.py`'s `merge_chunks`).

Scheduling rule (CPU): at most one decomposition program in flight. jaxlib's CPU LAPACK kernels block
pool threads while a batched call's pieces run; two such programs at once can deadlock the pool
(`drm_jax.math.lapack`). `decompose` therefore waits for a program that runs a rule's `prepare` before
the next one is dispatched, on CPU, whatever `check_finite` is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.engine import shard
from drm_jax.buffers import aligned_empty
from drm_jax.engine.compiled import (Layout, aligned, block_stats, combine_jit, finite_flags, is_traced, merge_block,
                                     merge_deltas_jit, merge_layers_jit, merge_once, prepare_group, under_trace)
from drm_jax.engine.endpoints import Source
from drm_jax.engine.host import combination_weights, combine, host_inputs
from drm_jax.engine.plan import Chunk, Plan
from drm_jax.engine.tree import model_label
from drm_jax.errors import MergeInputError
from drm_jax.math.state import number, with_number
from drm_jax.methods.base import MethodSpec, Rules


def wait_for_decomposition(out: Any) -> Any:
    """Block until a decomposition program's outputs are computed (`decompose`)."""
    return jax.block_until_ready(out)


def one_decomposition_at_a_time(rule) -> bool:
    """Whether programs running this rule's `prepare` must run one at a time: rules that decompose, on CPU."""
    return rule.prepare is not None and jax.default_backend() == "cpu"


def decompose(rule, program, *args, **kwargs):
    """`program(*args, **kwargs)`, a program that runs `rule.prepare`; on CPU its result is waited for before
    this returns, so no two decomposition programs are ever in flight (the module's scheduling rule)."""
    out = program(*args, **kwargs)
    if one_decomposition_at_a_time(rule):
        wait_for_decomposition(out)
    return out


def x64_scope(rule):
    """Float64 enabled while a rule that decomposes in float64 is traced and run (its outputs are float32)."""
    return jax.enable_x64(True) if rule.x64 and not jax.config.jax_enable_x64 else contextlib.nullcontext()


def run_prepare(rule, layout: Layout, base: tuple, models: tuple, check_inputs: bool = True):
    """`prepare_group` (base stack, prepared state, input flags), in float64 where the rule asks for it, one
    decomposition in flight on CPU."""
    with x64_scope(rule):
        return decompose(rule, prepare_group, rule, layout, base, models, check_inputs=check_inputs)


def to_device(x):
    """A host array as a device array: zero-copy on CPU where numpy's buffer is 64-byte aligned; otherwise
    one aligned copy made by NumPy first (`compiled.aligned`), faster than the copy the CPU client makes."""
    return jax.device_put(aligned(x)) if isinstance(x, np.ndarray) else x


def raise_non_finite_inputs(finite: np.ndarray, names: Sequence[str]) -> None:
    bad = np.argwhere(~finite)
    if bad.size:
        layer, column = bad[0]
        who = model_label(None if column == 0 else int(column) - 1)
        raise MergeInputError(f"leaf {names[layer]!r} of {who} contains NaN or Inf")


@dataclass
class Stored:
    """What a chunk keeps between merges: the stacked base and the rule's prepared state (leading layer
    axis of the chunk's padded length), and the unscaled merged delta of the last numbers (`cache_key`)."""

    base: Any
    state: Any
    delta: Any = None
    delta_key: Any = None


class Merged(NamedTuple):
    """A merged chunk: leaf indices and their merged leaves (stored layout and dtype); input flags
    (L, K + 1) or None; output flags (L,) or None where unchecked."""

    members: Sequence[int]
    leaves: Sequence[Any]
    finite_in: Any
    finite_out: Any


class Executor(Protocol):
    prepares: bool  # whether prepare_chunk keeps anything
    sharded: bool

    def prepare_chunk(self, chunk: Chunk) -> Stored | None: ...

    def merge_chunk(self, chunk: Chunk, stored: Stored | None, rows, threshold, hparams, per_member: bool, *,
                    check: bool, cache_key: Any = None) -> Merged: ...

    def inputs(self, chunk: Chunk) -> tuple[tuple, tuple]: ...

    def deltas(self, chunk: Chunk) -> Any: ...


class _Base:
    prepares = True
    sharded = False

    def __init__(self, spec: MethodSpec, rules: Rules, plan: Plan, source: Source, check_finite: bool = True):
        self.spec, self.rules, self.plan, self.source, self.check_finite = spec, rules, plan, source, check_finite

    def rule(self, chunk: Chunk):
        return self.rules.linear if chunk.group.role == "matrix" else self.rules.other

    def inputs(self, chunk: Chunk) -> tuple[tuple, tuple]:
        """The chunk's base and model leaves as read from the source (on the device)."""
        base = tuple(to_device(self.source.get_base(i)) for i in chunk.members)
        models = tuple(tuple(to_device(self.source.get_model(t, i)) for t in range(self.plan.num_models))
                       for i in chunk.members)
        return base, models

    def deltas(self, chunk: Chunk) -> Any:
        """The chunk's task vectors (L, K, ...) as its rule prepares them (for the whole-model thresholds)."""
        return run_prepare(self.rule(chunk), chunk.layout, *self.inputs(chunk))[1]

    def has_data(self, chunk: Chunk) -> bool:
        """Whether the chunk's rule reads per-leaf data (`MethodSpec.leaf_data`), stacked with its layers."""
        return bool(self.spec.leaf_data) and chunk.group.role == "matrix"

    def names(self, chunk: Chunk) -> list[str]:
        return [self.plan.names[i] for i in chunk.members]

    def checked(self, merged: tuple, check: bool):
        return finite_flags(tuple(merged)) if check and self.check_finite else None


class VmappedExecutor(_Base):
    """Stacked layers, `prepare` once, a vmapped `merge` per call (see the module docstring)."""

    def prepare_chunk(self, chunk: Chunk) -> Stored:
        rule = self.rule(chunk)
        base, state, finite = run_prepare(rule, chunk.layout, *self.inputs(chunk), check_inputs=self.check_finite)
        if self.check_finite:
            raise_non_finite_inputs(np.asarray(finite)[: len(chunk.members)], self.names(chunk))
        if rule.shrink is not None:
            state = rule.shrink(state)
        if self.has_data(chunk):
            data = [self.source.get_data(i) for i in chunk.members]
            state = (state, tuple(jnp.stack(column) for column in zip(*data)))
        return Stored(base, state)

    def merge_chunk(self, chunk, stored, rows, threshold, hparams, per_member, *, check, cache_key=None) -> Merged:
        rule = self.rule(chunk)
        if cache_key is not None:
            merged = self._merge_cached(chunk, stored, rule, rows, threshold, hparams, cache_key)
        else:
            merged = merge_layers_jit(rule, chunk.layout, stored.state, stored.base, rows, chunk.keys, threshold,
                                      hparams, per_member=per_member)
        return Merged(chunk.members, merged, None, self.checked(merged, check))

    def _merge_cached(self, chunk: Chunk, stored: Stored, rule, rows, threshold, hparams, key):
        """A method whose last stage multiplies by a global scale (`Rules.scaled_by`): the unscaled merged
        delta of the last numbers (`key`: every number but the scale) is kept per chunk, so a sweep over the
        scale alone (lambda after a drop rate) is one elementwise pass per merge instead of pruning,
        election and recomposition again."""
        scale_name = self.rules.scaled_by
        if stored.delta_key != key:
            unscaled = with_number(hparams, scale_name, jnp.ones_like(number(hparams, scale_name)))
            stored.delta = merge_deltas_jit(rule, stored.state, rows, chunk.keys, threshold, unscaled, stored.base)
            stored.delta_key = key
        return combine_jit(chunk.layout, stored.base, stored.delta, number(hparams, scale_name))


class FusedExecutor(_Base):
    """Rules that prepare nothing: one fused program per chunk from the stored inputs, nothing kept. A leaf
    whose stacked inputs exceed the budget (`Chunk.block_rows`) is merged in row blocks where its rule
    says how (`RowBlocks`): a statistics pass over the blocks, then each block merged with the sums."""

    prepares = False

    def prepare_chunk(self, chunk: Chunk) -> None:
        return None

    def merge_chunk(self, chunk, stored, rows, threshold, hparams, per_member, *, check, cache_key=None) -> Merged:
        rule, layout, k = self.rule(chunk), chunk.layout, self.plan.num_models
        if chunk.block_rows and rule.rows is not None and not under_trace() and not is_traced(rows, hparams):
            return self._merge_blocks(chunk, rule, rows, threshold, hparams, per_member, check)
        base = tuple(self.source.get_base(i) for i in chunk.members)
        models = tuple(tuple(self.source.get_model(t, i) for t in range(k)) for i in chunk.members)
        if check and self._on_host(layout, base, models):
            weights = np.asarray(combination_weights(rule, rows, hparams, k=k, dtype=layout.compute,
                                                     per_member=per_member))
            merged, finite = combine(base, models, weights, np.dtype(layout.compute), check=self.check_finite)
            return Merged(chunk.members, merged, None, finite)
        base = tuple(to_device(x) for x in base)
        models = tuple(tuple(to_device(x) for x in row) for row in models)
        merged, finite_in = merge_once(rule, layout, base, models, rows, chunk.keys, threshold, hparams,
                                       check_inputs=self.check_finite and not self.rules.linear_combination,
                                       per_member=per_member)
        return Merged(chunk.members, merged, finite_in, self.checked(merged, check))

    def _on_host(self, layout: Layout, base, models) -> bool:
        """Whether a linear combination of these inputs runs on the host (`engine/host.py`): NumPy inputs
        on the CPU backend, which XLA could read only after copying them, for a rule that is base + a
        linear function of the task vectors (not one that reads the base itself: passthrough)."""
        return (self.rules.linear_combination and not self.spec.reads_base and layout.round_to is None
                and jax.default_backend() == "cpu" and host_inputs(list(base) + [x for row in models for x in row]))

    def _merge_blocks(self, chunk: Chunk, rule, rows, threshold, hparams, per_member, check) -> Merged:
        """The chunk's one leaf in row blocks of `chunk.block_rows` rows (axis 0 in (out, in) orientation):
        the whole leaf is read once, each block is a view of it; the merged blocks fill one output array."""
        i, layout = chunk.members[0], chunk.layout
        transposed = layout.transposed[0]
        base = self.source.get_base(i)
        models = [self.source.get_model(t, i) for t in range(self.plan.num_models)]
        if is_traced(base, models):
            return self.merge_chunk(chunk._replace(block_rows=0), None, rows, threshold, hparams, per_member,
                                    check=check)
        total = np.shape(base)[1 if transposed else 0]

        def block(x, a):
            x = x[:, a:a + chunk.block_rows] if transposed else x[a:a + chunk.block_rows]
            return to_device(x)

        starts = range(0, total, chunk.block_rows)
        stats = None
        if rule.rows.stats is not None:
            sums = None
            for a in starts:
                part = block_stats(rule, layout, block(base, a), tuple(block(m, a) for m in models), rows,
                                   chunk.keys, hparams, np.uint32(a), per_member=per_member)
                sums = part if sums is None else jax.tree.map(np.add, sums, part)
            own = jax.tree.map(lambda x: x[0], hparams) if per_member else hparams
            stats = rule.rows.finish(sums, own) if rule.rows.finish is not None else sums
            stats = jax.tree.map(lambda x: np.asarray(x, layout.compute), stats)
        check_inputs = self.check_finite and not self.rules.linear_combination
        out = aligned_empty(int(np.prod(np.shape(base))) * jnp.dtype(layout.dtypes[0]).itemsize)
        out = out.view(jnp.dtype(layout.dtypes[0])).reshape(np.shape(base))
        finite_in = np.ones((1, self.plan.num_models + 1), bool)
        for a in starts:
            merged, flags = merge_block(rule, layout, block(base, a), tuple(block(m, a) for m in models), rows,
                                        chunk.keys, threshold, hparams, a, stats, check_inputs=check_inputs,
                                        per_member=per_member)
            if transposed:
                out[:, a:a + chunk.block_rows] = np.asarray(merged)
            else:
                out[a:a + chunk.block_rows] = np.asarray(merged)
            if flags is not None:
                finite_in &= np.asarray(flags)
        out = to_device(out)  # aligned: the same buffer, as a JAX array like every other merged leaf
        return Merged(chunk.members, (out,), finite_in if check_inputs else None, self.checked((out,), check))


class ShardedExecutor(_Base):
    """The layer axis split over `mesh`; each process reads and returns only its own devices' layers."""

    sharded = True

    def __init__(self, spec, rules, plan, source, check_finite=True, *, mesh):
        super().__init__(spec, rules, plan, source, check_finite)
        self.mesh = mesh

    def prepare_chunk(self, chunk: Chunk) -> Stored:
        base, state, finite = self._prepare(self.rule(chunk), chunk)
        flags = np.ones((len(chunk.members), self.plan.num_models + 1), bool)
        for r, f in shard.owned_rows(finite):
            if r < len(chunk.members):
                flags[r] = np.asarray(f)
        if self.check_finite:
            raise_non_finite_inputs(flags, self.names(chunk))
        return Stored(base, state)

    def _prepare(self, rule, c: Chunk):
        n, k, shape = len(c.members), self.plan.num_models, c.group.shape

        def canonical(x, r):
            x = np.asarray(jax.device_get(x))
            if c.layout.round_to is not None:  # mergekit's `dtype`: the input as that dtype holds it
                with np.errstate(over="ignore"):  # a value it cannot hold becomes Inf: refused by name, no warning
                    x = x.astype(jnp.dtype(c.layout.round_to))
            x = x.astype(np.float32)
            return x.T if c.layout.transposed[r] else x

        def base_row(r):
            return canonical(self.source.get_base(c.members[r]), r) if r < n else np.zeros(shape, np.float32)

        def model_row(r):
            if r >= n:
                return np.zeros((k,) + tuple(shape), np.float32)
            return np.stack([canonical(self.source.get_model(t, c.members[r]), r) for t in range(k)])

        with x64_scope(rule):
            base, state, finite = decompose(rule, shard.prepare_chunk, self.mesh, rule, c.length, shape, k, base_row,
                                            model_row, sanitize=self.check_finite)
        if self.has_data(c):
            def data_rows(j, entry):
                def row(r):
                    if r < n:
                        return self.source.get_data(c.members[r])[j]
                    return np.stack([entry.missing(shape)] * k)  # padding rows: a solvable merge, discarded
                return row

            state = (state, tuple(shard.stack_from_callback(self.mesh, c.length, (k,) + entry.shape(shape),
                                                            np.float32, data_rows(j, entry))
                                  for j, entry in enumerate(self.spec.leaf_data)))
        return base, state, finite

    def merge_chunk(self, chunk, stored, rows, threshold, hparams, per_member, *, check, cache_key=None) -> Merged:
        c = chunk
        stacked, flags = shard.merge_chunk(self.mesh, self.rule(c), stored.state, stored.base, rows, c.keys,
                                           threshold, hparams, per_member)
        owned = [(r, x) for r, x in shard.owned_rows(stacked) if r < len(c.members)]
        finite = np.ones(len(c.members), bool)
        for r, f in shard.owned_rows(flags):
            if r < len(c.members):
                finite[r] = bool(f)
        members = [c.members[r] for r, _ in owned]
        merged = [(x.T if c.layout.transposed[r] else x).astype(c.layout.round_to or c.layout.dtypes[r])
                  .astype(c.layout.dtypes[r]) for r, x in owned]
        return Merged(members, merged, None, finite)


def executor_for(spec: MethodSpec, rules: Rules, plan: Plan, source: Source, *, mesh=None,
                 check_finite: bool = True) -> Executor:
    """The plan's executor, chosen once: sharded over a mesh; fused where no rule prepares anything (and
    the method reads no per-leaf data); else vmapped."""
    if mesh is not None:
        return ShardedExecutor(spec, rules, plan, source, check_finite, mesh=mesh)
    if all(r.prepare is None and r.shrink is None for r in (rules.linear, rules.other)) and not spec.leaf_data:
        return FusedExecutor(spec, rules, plan, source, check_finite)
    return VmappedExecutor(spec, rules, plan, source, check_finite)


__all__ = ["Executor", "Merged", "Stored", "decompose", "executor_for", "raise_non_finite_inputs"]
