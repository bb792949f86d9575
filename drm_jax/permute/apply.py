"""Apply unit transforms to parameter trees: permute, merge (M on output axes, U on input axes, sum),
and recompute BatchNorm statistics.

A `GroupTransform` holds, per model k, the 0/1 unmerge matrix U_k of shape (n, n_merged): U_k[i, c] = 1
when unit i of model k belongs to merged unit c. The merge matrix is M_k = U_k^T / size(c), so that a
merged unit is the mean of its members over all models (ZipIt, arXiv 2305.03053; alignment is the
special case where every merged unit has one member per model: M_k = P_k / K, U_k = P_k^T, giving
(W_A + P W_B P'^T) / 2 for two models).

A merged layer is sum_k M_k^out W_k U_k^in. Arrays without any output-role axis (a classifier kernel
read from merged features) are the mean over models of W_k U_k^in. Arrays the spec does not touch are
averaged. Arithmetic runs on the host in float64 and is cast back to each array's dtype, so permuting
and averaging identical copies is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import jax
import numpy as np

from drm_jax.errors import MergeInputError
from drm_jax.permute.capture import ApplyFn, population_batch_norm_stats
from drm_jax.permute.spec import AxisMember, PermGroup, PermutationSpec, get_path, normalize_axes, validate_spec


@dataclass(frozen=True)
class GroupTransform:
    """unmerge: per model, (n, n_merged) 0/1 membership matrix U_k."""

    unmerge: tuple[np.ndarray, ...]

    @property
    def cluster_sizes(self) -> np.ndarray:
        return np.sum([u.sum(axis=0) for u in self.unmerge], axis=0)

    @property
    def merge(self) -> tuple[np.ndarray, ...]:
        """Per model, (n_merged, n) averaging matrix M_k = U_k^T / cluster size."""
        sizes = np.maximum(self.cluster_sizes, 1.0)
        return tuple(u.T / sizes[:, None] for u in self.unmerge)


Transforms = dict[str, GroupTransform]


def identity_transform(size: int, num_models: int) -> GroupTransform:
    """Plain averaging: unit i of every model goes to merged unit i."""
    return GroupTransform(tuple(np.eye(size) for _ in range(num_models)))


def permutation_transform(perms: Sequence[np.ndarray]) -> GroupTransform:
    """perms[k][i] = the unit of model k matched to merged unit i (perms[0] is usually the identity)."""
    unmerge = []
    for perm in perms:
        u = np.zeros((len(perm), len(perm)))
        u[np.asarray(perm), np.arange(len(perm))] = 1.0
        unmerge.append(u)
    return GroupTransform(tuple(unmerge))


def split_unmerge(stacked: np.ndarray, num_models: int) -> GroupTransform:
    """(K * n, n_merged) membership over the stacked units of all models -> per-model U_k."""
    return GroupTransform(tuple(np.split(stacked, num_models, axis=0)))


# ----------------------------------------------------------------------------------------------------
# Axis arithmetic


def apply_on_axes(x: np.ndarray, axes: tuple[int, ...], matrix: np.ndarray, side: str) -> np.ndarray:
    """Contract the flattened `axes` of x with `matrix`.

    side "left": new units = matrix @ units (matrix (m, n)); side "right": units @ matrix (matrix (n, m)).
    The flattened axes are restored when m == n; otherwise they must be a single axis.
    """
    axes = normalize_axes(axes, x.ndim)
    first, last = axes[0], axes[-1]
    units = int(np.prod([x.shape[a] for a in axes]))
    flat = x.reshape(x.shape[:first] + (units,) + x.shape[last + 1 :])
    if side == "left":
        out = np.moveaxis(np.tensordot(matrix, flat, axes=(1, first)), 0, first)
    else:
        out = np.moveaxis(np.tensordot(flat, matrix, axes=(first, 0)), -1, first)
    if out.shape[first] == units:
        return out.reshape(x.shape)
    if len(axes) > 1:
        raise MergeInputError(f"cannot change the width of multi-axis units {axes} ({units} -> {out.shape[first]})")
    return out


def transform_array(
    x: np.ndarray,
    members: Sequence[tuple[PermGroup, AxisMember]],
    transforms: Transforms,
    model: int,
    out_matrix: str = "merge",
    skip: str | None = None,
) -> np.ndarray:
    """Apply model `model`'s transforms of every group touching this array (except group `skip`).

    out_matrix: "merge" uses M_k on output axes (merging); "membership" uses U_k^T (similarity features,
    where a unit's row should be gathered, not averaged).
    """
    for group, member in members:
        if group.name == skip:
            continue
        transform = transforms[group.name]
        if member.role == "out":
            matrix = transform.merge[model] if out_matrix == "merge" else transform.unmerge[model].T
            x = apply_on_axes(x, member.axes, matrix, "left")
        else:
            x = apply_on_axes(x, member.axes, transform.unmerge[model], "right")
    return x


def _leaf_paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = []
    for key_path, leaf in flat:
        paths.append((tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in key_path), leaf))
    return paths


def check_same_structure(trees: Sequence[Any]) -> None:
    """All trees have the structure and leaf shapes of the first and finite values; MergeInputError
    naming the model and the leaf otherwise."""
    if len(trees) < 2:
        raise MergeInputError(f"merging needs at least two parameter trees, got {len(trees)}")
    reference = _leaf_paths(trees[0])
    for index, tree in enumerate(trees):
        leaves = _leaf_paths(tree)
        if [p for p, _ in leaves] != [p for p, _ in reference]:
            diff = sorted({p for p, _ in reference} ^ {p for p, _ in leaves})[:3]
            raise MergeInputError(
                f"model {index} has a different parameter tree than model 0: {['/'.join(d) for d in diff]}"
            )
        for (path, a), (_, b) in zip(reference, leaves):
            if np.shape(a) != np.shape(b):
                raise MergeInputError(
                    f"model {index}: parameter {'/'.join(path)} has shape {np.shape(b)}, model 0 has {np.shape(a)}"
                )
            if not np.all(np.isfinite(np.asarray(b, dtype=np.float64))):
                raise MergeInputError(f"model {index}: parameter {'/'.join(path)} contains NaN or Inf")


def _map_with_path(fn, tree: Any) -> Any:
    def visit(key_path, leaf):
        path = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in key_path)
        return fn(path, leaf)

    return jax.tree_util.tree_map_with_path(visit, tree)


def _like(value: np.ndarray, leaf: Any) -> Any:
    dtype = getattr(leaf, "dtype", np.float32)
    return jax.numpy.asarray(value.astype(dtype))


def merge_variables(trees: Sequence[Any], spec: PermutationSpec, transforms: Transforms) -> Any:
    """sum_k M_k^out W_k U_k^in per array (mean over k when no output axis is transformed)."""
    table = spec.members_by_path()

    def merge_leaf(path, leaf):
        members = table.get(path, [])
        values = [
            transform_array(np.asarray(get_path(tree, path), np.float64), members, transforms, k)
            for k, tree in enumerate(trees)
        ]
        total = np.sum(values, axis=0)
        if not any(member.role == "out" for _, member in members):
            total = total / len(trees)
        return _like(total, leaf)

    return _map_with_path(merge_leaf, trees[0])


# ----------------------------------------------------------------------------------------------------
# Permutations


def permute_variables(variables: Any, spec: PermutationSpec, perms: dict[str, np.ndarray]) -> Any:
    """A functionally identical copy: new unit i of group g = old unit perms[g][i], on every member axis
    (output and input alike). Groups missing from `perms` stay in place."""
    validate_spec(spec, variables)
    table = spec.members_by_path()

    def permute_leaf(path, leaf):
        x = np.asarray(leaf)
        for group, member in table.get(path, []):
            if group.name not in perms:
                continue
            axes = normalize_axes(member.axes, x.ndim)
            units = int(np.prod([x.shape[a] for a in axes]))
            flat = x.reshape(x.shape[: axes[0]] + (units,) + x.shape[axes[-1] + 1 :])
            x = np.take(flat, np.asarray(perms[group.name]), axis=axes[0]).reshape(x.shape)
        return _like(x, leaf)

    return _map_with_path(permute_leaf, variables)


def random_permutations(spec: PermutationSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """A random permutation per group that keeps blocks whole: units shuffled inside each block, blocks
    shuffled, and linked groups (one attention layer) sharing their block shuffle."""
    rng = np.random.default_rng(seed)
    perms: dict[str, np.ndarray] = {}
    block_orders: dict[str, np.ndarray] = {}
    for group in spec.groups:
        if group.block_size == 1 and group.block_link is None:
            perms[group.name] = rng.permutation(group.size)
            continue
        key = group.block_link or group.name
        if key not in block_orders:
            block_orders[key] = rng.permutation(group.num_blocks)
        inner = [rng.permutation(group.block_size) for _ in range(group.num_blocks)]
        perms[group.name] = np.concatenate(
            [block * group.block_size + inner[i] for i, block in enumerate(block_orders[key])]
        )
    return perms


# ----------------------------------------------------------------------------------------------------
# BatchNorm statistics


def recompute_batch_stats(variables: Any, apply_fn: ApplyFn, batches: Iterable[Any]) -> Any:
    """Replace every BatchNorm's running mean/var by the population statistics of its input over `batches`
    (training-mode forward passes, float64 accumulation). A merged model's activations no longer have
    the statistics either parent stored (REPAIR / ZipIt / MuDSC reset them the same way).

    Returns a new tree; modules never reached by `apply_fn` keep their statistics.
    """
    stats = population_batch_norm_stats(apply_fn, variables, batches)
    if not stats:
        return variables

    def replace(path, leaf):
        if len(path) >= 2 and path[0] == "batch_stats" and path[-1] in ("mean", "var") and path[1:-1] in stats:
            mean, var = stats[path[1:-1]]
            value = mean if path[-1] == "mean" else var
            if np.shape(value) != np.shape(leaf):
                raise MergeInputError(
                    f"BatchNorm statistics {'/'.join(path)}: computed {np.shape(value)}, stored {np.shape(leaf)}"
                )
            return _like(np.asarray(value), leaf)
        return leaf

    return _map_with_path(replace, variables)
