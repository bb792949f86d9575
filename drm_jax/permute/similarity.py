"""Unit similarity in weight space and activation space (Pearson correlation), MuDSC arXiv 2403.01753.

Both similarities are returned over the *stacked* units of all K models: a (K n, K n) matrix whose
block (a, b) compares the units of model a with those of model b. Alignment reads the blocks (0, k);
zipping also uses the within-model blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from drm_jax.permute.apply import Transforms, transform_array
from drm_jax.permute.capture import ApplyFn, batch_inputs, make_site_capture
from drm_jax.permute.spec import AxisMember, PermGroup, PermutationSpec, get_path, normalize_axes

# Variable collections that hold running statistics, not weights: left out of weight similarity.
STATISTICS_COLLECTIONS = ("batch_stats",)
# Keeps the correlation of a constant unit finite (it is then 0 with everything).
_EPS = 1e-12
# Relative variance below which a unit counts as constant (float64 cancellation is ~1e-16).
_CONSTANT_RTOL = 1e-10


def pearson_rows(features: np.ndarray) -> np.ndarray:
    """(units, d) -> (units, units) Pearson correlation of the rows, in float64."""
    x = np.asarray(features, np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norms = np.sqrt(np.sum(x * x, axis=1, keepdims=True))
    x = x / np.maximum(norms, _EPS)
    return x @ x.T


def pearson_from_moments(count: float, total: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """Correlation from sum(x) (u,) and sum(x x^T) (u, u) over `count` samples; float64."""
    mean = total / count
    cov = outer / count - np.outer(mean, mean)
    var = np.diag(cov)
    # E[x^2] - E[x]^2 cancels: a variance at rounding level of E[x^2] is a constant (e.g. dead) unit
    constant = var <= _CONSTANT_RTOL * np.maximum(np.diag(outer) / count, _EPS)
    std = np.where(constant, np.inf, np.sqrt(np.maximum(var, 0.0)))
    return cov / np.maximum(np.outer(std, std), _EPS)


# ----------------------------------------------------------------------------------------------------
# Weight space


def unit_weight_vectors(
    tree: Any,
    group: PermGroup,
    table: dict[tuple[str, ...], list[tuple[PermGroup, AxisMember]]],
    transforms: Transforms,
    model: int,
) -> np.ndarray:
    """(n, d): each unit's parameters concatenated along the group axis, after applying
    model `model`'s current transforms of every *other* group that touches the same arrays (so rows of
    different models are comparable). Statistics collections (batch_stats) are not weights."""
    rows = []
    for member in group.members:
        if member.path[0] in STATISTICS_COLLECTIONS:
            continue
        x = np.asarray(get_path(tree, member.path), np.float64)
        x = transform_array(x, table[member.path], transforms, model, out_matrix="membership", skip=group.name)
        axes = normalize_axes(member.axes, x.ndim)
        rest = tuple(a for a in range(x.ndim) if a not in axes)
        rows.append(np.transpose(x, axes + rest).reshape(group.size, -1))
    return np.concatenate(rows, axis=1)


def weight_similarity(
    trees: Sequence[Any], spec: PermutationSpec, group: PermGroup, transforms: Transforms
) -> np.ndarray:
    """(K n, K n) Pearson correlation of the units' weight vectors under the current transforms."""
    table = spec.members_by_path()
    stacked = np.concatenate(
        [unit_weight_vectors(tree, group, table, transforms, k) for k, tree in enumerate(trees)], axis=0
    )
    return pearson_rows(stacked)


# ----------------------------------------------------------------------------------------------------
# Activation space


@dataclass
class Moments:
    """Running sum(x) and sum(x x^T) over samples of the stacked units [model 0 | model 1 | ...]."""

    count: float
    total: np.ndarray
    outer: np.ndarray

    def correlation(self) -> np.ndarray:
        return pearson_from_moments(self.count, self.total, self.outer)


def activation_moments(
    trees: Sequence[Any], spec: PermutationSpec, apply_fn: ApplyFn, batches: Iterable[Any]
) -> dict[str, Moments]:
    """Run every model on the same batches and accumulate each group's moments.

    A group's features at each of its sites are stacked as samples (a residual stream observed at
    several layers). Features are captured in float32 or wider; sums and products are formed and
    accumulated in float64 on the host.
    """
    sites = [(group.name, site) for group in spec.groups for site in group.sites]
    capture = make_site_capture(apply_fn, tuple(site for _, site in sites))
    moments: dict[str, Moments] = {}
    for batch in batches:
        inputs = batch_inputs(batch)
        per_model = [capture(tree, inputs) for tree in trees]
        for index, (name, _) in enumerate(sites):
            x = np.concatenate([np.asarray(features[index], np.float64) for features in per_model], axis=1)
            acc = moments.get(name)
            if acc is None:
                moments[name] = Moments(float(x.shape[0]), x.sum(axis=0), x.T @ x)
            else:
                acc.count += x.shape[0]
                acc.total += x.sum(axis=0)
                acc.outer += x.T @ x
    return moments
