"""The merge plan: an immutable value made by pure functions.

`plan_roles` gives every leaf a role and groups the same-shaped leaves of the merged roles; `plan_chunks`
cuts each group into chunks under the memory budget (padded to a mesh's device count), each with its
static layout and its leaves' PRNG keys; `make_plan` numbers the merged leaves (the columns of per-layer
coefficients). Nothing here reads a leaf's values or runs a program: executors (`engine/executors.py`)
run a plan, a `Prepared` (`engine/prepare.py`) keeps what they prepared.
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.engine import roles as roles_lib
from drm_jax.engine import shard
from drm_jax.engine.compiled import Layout
from drm_jax.engine.options import MergeOptions
from drm_jax.engine.stack import Group, chunk_length, chunks, group_leaves
from drm_jax.engine.tree import align_models, flatten, host_array, tree_list
from drm_jax.errors import MergeInputError, quote

# mergekit's `dtype` (inputs are cast to it before merging) -> (the engine's compute dtype, rounding dtype)
_COMPUTE_DTYPES = {"float32": ("float32", None), "float64": ("float64", None),
                   "float16": ("float32", "float16"), "bfloat16": ("float32", "bfloat16")}


def resolve_compute_dtype(name: str | None) -> tuple[str | None, str | None]:
    """(compute dtype or None for each leaf's own, round_to or None) of a `compute_dtype` argument.

    float16 / bfloat16: every input is rounded to it, the arithmetic runs in float32 with the method's
    stages rounding where mergekit's arithmetic in that dtype rounds, and the outputs are rounded to it.
    float64 needs jax_enable_x64 (else float32)."""
    if name is None:
        return None, None
    if name not in _COMPUTE_DTYPES:
        raise MergeInputError(f"compute_dtype must be one of {sorted(_COMPUTE_DTYPES)} or None, got {quote(name)}")
    compute, round_to = _COMPUTE_DTYPES[name]
    if compute == "float64" and not jax.config.jax_enable_x64:
        compute = "float32"
    return compute, round_to


def leaf_key(seed: int, name: str) -> np.ndarray:
    """PRNG key (2,) uint32 of one leaf: the seed folded with a stable hash of its name (independent of
    grouping); `leaf_keys` of that one name."""
    return leaf_keys(seed, [name])[0]


def leaf_keys(seed: int, names: Sequence[str]) -> np.ndarray:
    """(N, 2) uint32: the PRNG key of each leaf, the seed folded with a stable hash of its name, folded in
    batches of `_KEY_BATCH` names (a key per leaf, one dispatch each, cost a merge of a hundred small
    leaves more than its arithmetic; a fixed batch keeps one program whatever the number of leaves).
    Concrete inside the caller's jax.jit too."""
    count = len(names)
    data = np.zeros(-(-count // _KEY_BATCH) * _KEY_BATCH, np.uint32)
    data[:count] = [_name_hash(n) for n in names]
    with jax.ensure_compile_time_eval():
        root = jax.random.PRNGKey(seed)
        batches = [np.asarray(_fold_batch(root, data[i:i + _KEY_BATCH])) for i in range(0, data.size, _KEY_BATCH)]
    return np.concatenate(batches)[:count] if batches else np.zeros((0, 2), np.uint32)


_KEY_BATCH = 64
_fold_batch = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(None, 0)))


def _name_hash(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def compute_dtype(dtype) -> str:
    """float32, or float64 for float64 leaves when jax_enable_x64 is on."""
    if np.dtype(dtype) == np.float64 and jax.config.jax_enable_x64:
        return "float64"
    return "float32"


class Chunk(NamedTuple):
    """Members of one call: leaf indices, their static layout, keys, their positions in
    `Plan.layer_names` (`layer_rows`) and the padded length of a chunk split over a mesh.

    block_rows: 0, or, for a chunk of one leaf whose stacked inputs exceed the memory budget, the rows
    (axis 0 in (out, in) orientation) of each row block a rule with `RowBlocks` merges it in."""

    group: Group
    members: tuple[int, ...]
    layout: Layout
    keys: np.ndarray
    length: int = 0
    layer_rows: np.ndarray | None = None
    block_rows: int = 0

    @property
    def role(self) -> str:
        return self.group.role


class Plan(NamedTuple):
    """Every leaf's name, the chunks in merge order, K, and the merged leaves in chunk order."""

    names: tuple[str, ...]
    chunks: tuple[Chunk, ...]
    num_models: int
    layer_names: tuple[str, ...]

    def leaves(self) -> list[int]:
        """The merged leaves' indices, in chunk order."""
        return [i for c in self.chunks for i in c.members]


def make_plan(names: Sequence[str], chunks_: Sequence[Chunk], num_models: int) -> Plan:
    """The plan of these chunks: each chunk's `layer_rows` numbered in chunk order."""
    out, start = [], 0
    for c in chunks_:
        out.append(c._replace(layer_rows=np.arange(start, start + len(c.members))))
        start += len(c.members)
    return Plan(tuple(names), tuple(out), num_models, tuple(names[i] for c in out for i in c.members))


def plan_roles(names, shapes, dtypes, options: MergeOptions, every_leaf: bool = False):
    """(each leaf's role, the groups of same-shaped leaves of the merged roles). every_leaf: `names` are all
    the leaves of the merge (not a streamed batch), so a given pattern that matches none of them is refused."""
    rules = roles_lib.RoleRules(include=options.include, exclude=options.exclude, ignore=options.ignore,
                                layout=options.layout)
    if every_leaf:
        rules.check_matched(names)
    leaf_roles = [rules(n, tuple(s), d) for n, s, d in zip(names, shapes, dtypes)]
    canonical = [tuple(s)[::-1] if r.transpose else tuple(s) for r, s in zip(leaf_roles, shapes)]
    groups = [g for g in group_leaves([r.role for r in leaf_roles], canonical) if g.role in ("matrix", "other")]
    return leaf_roles, groups


# A leaf cut into row blocks stays in memory whole while its blocks are merged (its inputs are read
# once), so each block's stacked inputs are kept to this fraction of the budget.
ROW_BLOCK_DIVISOR = 4


def block_rows(shape: tuple[int, ...], num_models: int, max_group_bytes: int | None) -> int:
    """Rows per block of a leaf of this canonical shape whose stacked float32 inputs (base and K models)
    exceed `max_group_bytes`: blocks of at most max_group_bytes / ROW_BLOCK_DIVISOR (at least one row);
    0 where the leaf fits, has fewer than 2 axes, or would be one block."""
    row_bytes = (num_models + 1) * math.prod(shape[1:]) * 4
    if max_group_bytes is None or len(shape) < 2 or shape[0] * row_bytes <= max_group_bytes:
        return 0
    rows = max(1, max_group_bytes // ROW_BLOCK_DIVISOR // max(1, row_bytes))
    return rows if rows < shape[0] else 0


def plan_chunks(groups, leaf_roles, names, dtypes, num_models, seed, options: MergeOptions) -> list[Chunk]:
    """Every group cut into chunks of at most `options.max_group_bytes` of stacked float32 inputs (padded
    to the device count of `options.mesh`), computed in `options.compute_dtype` (`resolve_compute_dtype`);
    a leaf that exceeds it alone gets its row blocks (`block_rows`, without a mesh)."""
    compute, round_to = resolve_compute_dtype(options.compute_dtype)
    max_group_bytes, mesh = options.max_group_bytes, options.mesh
    out = []
    all_keys = leaf_keys(seed, names)
    for group in groups:
        layer_bytes = (num_models + 1) * math.prod(group.shape) * 4
        length = chunk_length(len(group.members), layer_bytes, max_group_bytes)
        rows = block_rows(group.shape, num_models, max_group_bytes) if mesh is None else 0
        if mesh is not None:
            length = shard.padded_length(length, mesh)
        for members in chunks(group.members, length):
            layout = Layout(tuple(leaf_roles[i].transpose for i in members),
                            tuple(jnp.dtype(dtypes[i]).name for i in members),
                            compute or compute_dtype(dtypes[members[0]]), round_to)
            keys = all_keys[list(members)]
            out.append(Chunk(group, tuple(members), layout, keys, length=length, block_rows=rows))
    return out


def plan_trees(base, models, options: MergeOptions, seed: int):
    """Trees checked against each other, roles given and chunks planned: (flat base as given, its leaves as
    arrays JAX reads (`host_array`: torch tensors as NumPy), model leaves likewise in the base's leaf order,
    chunks)."""
    models = tree_list(models)
    if not models:
        raise MergeInputError("no models to merge")
    flat = flatten(base)
    model_leaves = [[host_array(x, n) for n, x in zip(flat.names, leaves)] for leaves in align_models(flat, models)]
    base_leaves = [host_array(x, n) for n, x in zip(flat.names, flat.leaves)]
    shapes = [np.shape(x) for x in base_leaves]
    dtypes = [jnp.result_type(x) for x in base_leaves]
    leaf_roles, groups = plan_roles(flat.names, shapes, dtypes, options, every_leaf=True)
    return flat, base_leaves, model_leaves, plan_chunks(groups, leaf_roles, flat.names, dtypes, len(models), seed,
                                                        options)


__all__ = ["Chunk", "Plan", "block_rows", "compute_dtype", "leaf_key", "make_plan", "plan_chunks", "plan_roles", "plan_trees",
           "resolve_compute_dtype"]
