"""Merging models trained from different initializations: MuDSC and the permutation family.

- `mudsc`: dual-space similarity S = alpha * S_weight + (1 - alpha) * S_act (MuDSC, arXiv 2403.01753),
  alignment ("align") or ZipIt-style zipping ("zip"); alpha default 0.5.
- `weight_matching`: Git Re-Basin weight matching (arXiv 2209.04836) = `mudsc(alpha=1)`, no activations.
- `activation_align`: activation matching (Git Re-Basin / Li et al.) = `mudsc(alpha=0)`.
- `zipit`: ZipIt! (arXiv 2305.03053) = `mudsc(mode="zip", alpha=0)`.
- `average`: plain weight averaging.
- `permute_merge`: one entry point selecting any of them by name.

Every method takes K >= 2 variables trees of the same Flax model, a `PermutationSpec`, the model's
`apply_fn(variables, inputs)` (inference mode) and an iterable of batches (arrays, or (inputs, labels)
pairs), and returns a merged variables tree with model 0's structure. With alignment every model k > 0
is matched to model 0.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from drm_jax.errors import MergeInputError
from drm_jax.permute.apply import (
    Transforms,
    check_same_structure,
    identity_transform,
    merge_variables,
    permutation_transform,
    recompute_batch_stats,
    split_unmerge,
)
from drm_jax.permute.capture import ApplyFn
from drm_jax.permute.matching import block_hungarian, cluster_score, hungarian, zip_greedy
from drm_jax.permute.similarity import Moments, activation_moments, weight_similarity
from drm_jax.permute.spec import PermGroup, PermutationSpec, validate_spec

MODES = ("align", "zip")
METHODS = ("mudsc", "weight_matching", "activation_align", "zipit", "average")


@dataclass(frozen=True)
class MatchResult:
    """transforms: group name -> GroupTransform; score: the objective of the kept solution (sum over
    groups of the matched similarity); rounds: coordinate-ascent rounds run (0 when none were needed)."""

    transforms: Transforms
    score: float
    rounds: int


@dataclass(frozen=True)
class _Solver:
    trees: Sequence[Any]
    spec: PermutationSpec
    mode: str
    alpha: float
    activation: dict[str, np.ndarray]
    zip_alpha: float
    zip_beta: float

    @property
    def num_models(self) -> int:
        return len(self.trees)

    def similarity(self, group: PermGroup, transforms: Transforms, activation_only: bool = False) -> np.ndarray:
        """(K n, K n) dual-space similarity; weight-only for a group without activation sites."""
        act = self.activation.get(group.name)
        if act is not None and (activation_only or self.alpha == 0.0):
            return act
        weight = weight_similarity(self.trees, self.spec, group, transforms)
        if act is None or self.alpha == 1.0:
            return weight
        return self.alpha * weight + (1.0 - self.alpha) * act

    def solve(self, coord: tuple[str, ...], transforms: Transforms, activation_only: bool = False) -> Transforms:
        groups = [self.spec.group(name) for name in coord]
        sims = [self.similarity(group, transforms, activation_only) for group in groups]
        blocked = any(g.block_size > 1 or g.block_link is not None for g in groups)
        if self.mode == "zip" and not blocked:
            # ZipIt for free units; heads and GroupNorm groups keep their block structure by alignment
            return {coord[0]: split_unmerge(zip_greedy(sims[0], self.num_models, self.zip_alpha, self.zip_beta),
                                            self.num_models)}
        perms: list[list[np.ndarray]] = [[np.arange(g.size)] for g in groups]
        for k in range(1, self.num_models):
            cross = [s[: g.size, k * g.size : (k + 1) * g.size] for g, s in zip(groups, sims)]
            if blocked:
                found = block_hungarian(cross, [g.block_size for g in groups])
            else:
                found = [hungarian(cross[0])]
            for per_group, perm in zip(perms, found):
                per_group.append(perm)
        return {name: permutation_transform(p) for name, p in zip(coord, perms)}

    def objective(self, transforms: Transforms) -> float:
        total = 0.0
        for group in self.spec.groups:
            stacked = np.concatenate(transforms[group.name].unmerge, axis=0)
            total += cluster_score(self.similarity(group, transforms), stacked)
        return total


def match_units(
    trees: Sequence[Any],
    spec: PermutationSpec,
    apply_fn: ApplyFn | None = None,
    batches: Iterable[Any] | None = None,
    *,
    mode: str = "align",
    alpha: float = 0.5,
    zip_alpha: float = 0.5,
    zip_beta: float = 1.0,
    seed: int = 0,
    max_rounds: int = 100,
    patience: int = 5,
) -> MatchResult:
    """Find each group's transform (MuDSC's search; see `mudsc` for the arguments).

    alpha = 0: activation similarity only, solved once (no dependence between groups).
    alpha = 1: weight similarity only, no activations are computed; coordinate ascent starts from the
      identity (Git Re-Basin).
    0 < alpha < 1: start from the activation-only solution, then coordinate ascent.
    Coordinate ascent: each round visits the groups (linked head groups together) in a random order
    drawn from `seed`, re-solving each with S_weight recomputed under the current transforms of the
    others; the best-scoring solution is kept; stop after `patience` rounds without improvement or
    `max_rounds` rounds.
    """
    trees = list(trees)
    check_same_structure(trees)
    validate_spec(spec, trees[0])
    if mode not in MODES:
        raise MergeInputError(f"unknown mode {mode!r}; expected one of {MODES}")
    if not 0.0 <= alpha <= 1.0:
        raise MergeInputError(f"alpha must lie in [0, 1], got {alpha}")
    if zip_beta <= 0:
        raise MergeInputError(f"zip_beta must be positive, got {zip_beta}")
    if max_rounds < 0 or patience < 1:
        raise MergeInputError(f"need max_rounds >= 0 and patience >= 1, got {max_rounds}, {patience}")
    activation: dict[str, np.ndarray] = {}
    if alpha < 1.0:
        if apply_fn is None or batches is None:
            raise MergeInputError(f"alpha={alpha} uses activations: pass apply_fn and batches (or use alpha=1)")
        batches = list(batches)
        if not batches:
            raise MergeInputError("batches is empty: activation similarity needs at least one batch")
        moments: dict[str, Moments] = activation_moments(trees, spec, apply_fn, batches)
        activation = {name: m.correlation() for name, m in moments.items()}
    solver = _Solver(trees, spec, mode, float(alpha), activation, float(zip_alpha), float(zip_beta))
    coords = spec.coordinates()
    transforms: Transforms = {g.name: identity_transform(g.size, len(trees)) for g in spec.groups}
    if activation:
        for coord in coords:
            if all(name in activation for name in coord):
                transforms.update(solver.solve(coord, transforms, activation_only=True))
    best_score = solver.objective(transforms)
    if alpha == 0.0 and all(g.name in activation for g in spec.groups):
        return MatchResult(transforms, best_score, 0)
    best = dict(transforms)
    rng = np.random.default_rng(seed)
    stale = 0
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        for index in rng.permutation(len(coords)):
            transforms.update(solver.solve(coords[index], transforms))
        score = solver.objective(transforms)
        if score > best_score + 1e-9 * max(1.0, abs(best_score)):
            best, best_score, stale = dict(transforms), score, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return MatchResult(best, best_score, rounds)


def _finish(
    trees: Sequence[Any],
    spec: PermutationSpec,
    transforms: Transforms,
    apply_fn: ApplyFn | None,
    batches: Sequence[Any] | None,
    recompute_bn_stats: bool,
) -> Any:
    merged = merge_variables(trees, spec, transforms)
    if recompute_bn_stats and apply_fn is not None and batches:
        merged = recompute_batch_stats(merged, apply_fn, batches)
    return merged


def _as_list(batches: Iterable[Any] | None) -> list[Any] | None:
    # batches are read twice (activations, then BatchNorm statistics): a generator must be kept
    return None if batches is None else list(batches)


def mudsc(
    trees: Sequence[Any],
    spec: PermutationSpec,
    apply_fn: ApplyFn | None = None,
    batches: Iterable[Any] | None = None,
    *,
    mode: str = "align",
    alpha: float = 0.5,
    zip_alpha: float = 0.5,
    zip_beta: float = 1.0,
    seed: int = 0,
    max_rounds: int = 100,
    patience: int = 5,
    recompute_bn_stats: bool = True,
) -> Any:
    """MuDSC merge (arXiv 2403.01753): match units with S = alpha * S_weight + (1 - alpha) * S_act, then
    transform every model (merge matrices on output axes, unmerge on input axes) and average.

    trees: K >= 2 variables trees of one model ({"params": ..., "batch_stats": ...}); never modified.
    spec: which axes carry which units (`mlp_spec`, `resnet_spec`, `vit_spec` or hand-written).
    apply_fn: (variables, inputs) -> outputs in inference mode; needed for activations (alpha < 1) and
      for recomputing BatchNorm statistics.
    batches: iterable of inputs or (inputs, labels); read for activations and BatchNorm statistics.
    mode: "align" (permutations onto model 0: (W_A + P W_B) / 2) or "zip" (ZipIt greedy zip of the most
      similar units, within a model too; head and GroupNorm blocks are aligned).
    alpha: weight of the weight-space similarity, default 0.5 (the paper sweeps 0.1..0.9).
    zip_alpha, zip_beta: ZipIt's alpha (similarity decay of merged features, default 0.5) and per-model
      beta budget of within-model merges (default 1). With K > 2 models a unit is zipped K - 1 times and
      zip_alpha < 1 lowers its similarity to the remaining copies each time.
    seed, max_rounds, patience: coordinate ascent order, at most 100 rounds, stop after 5 without gain.
    recompute_bn_stats: refill BatchNorm running statistics from `batches` (default True; skipped when
      apply_fn or batches are missing).
    Returns the merged variables tree (same structure and dtypes as trees[0]).
    """
    batches = _as_list(batches)
    result = match_units(trees, spec, apply_fn, batches, mode=mode, alpha=alpha, zip_alpha=zip_alpha,
                         zip_beta=zip_beta, seed=seed, max_rounds=max_rounds, patience=patience)
    return _finish(trees, spec, result.transforms, apply_fn, batches, recompute_bn_stats)


def weight_matching(
    trees: Sequence[Any],
    spec: PermutationSpec,
    apply_fn: ApplyFn | None = None,
    batches: Iterable[Any] | None = None,
    *,
    seed: int = 0,
    max_rounds: int = 100,
    patience: int = 5,
    recompute_bn_stats: bool = True,
) -> Any:
    """Git Re-Basin weight matching (arXiv 2209.04836): `mudsc(mode="align", alpha=1)`. Needs no data;
    batches, when given, only refill BatchNorm statistics."""
    return mudsc(trees, spec, apply_fn, batches, mode="align", alpha=1.0, seed=seed, max_rounds=max_rounds,
                 patience=patience, recompute_bn_stats=recompute_bn_stats)


def activation_align(
    trees: Sequence[Any],
    spec: PermutationSpec,
    apply_fn: ApplyFn,
    batches: Iterable[Any],
    *,
    recompute_bn_stats: bool = True,
) -> Any:
    """Activation matching: Hungarian on the Pearson correlation of activations, `mudsc(alpha=0)`."""
    return mudsc(trees, spec, apply_fn, batches, mode="align", alpha=0.0, recompute_bn_stats=recompute_bn_stats)


def zipit(
    trees: Sequence[Any],
    spec: PermutationSpec,
    apply_fn: ApplyFn,
    batches: Iterable[Any],
    *,
    alpha: float = 0.5,
    beta: float = 1.0,
    recompute_bn_stats: bool = True,
) -> Any:
    """ZipIt! (arXiv 2305.03053) on activation correlations: `mudsc(mode="zip", alpha=0,
    zip_alpha=alpha, zip_beta=beta)`. alpha: ZipIt's similarity decay for merged features; beta: budget."""
    return mudsc(trees, spec, apply_fn, batches, mode="zip", alpha=0.0, zip_alpha=alpha, zip_beta=beta,
                 recompute_bn_stats=recompute_bn_stats)


def average(
    trees: Sequence[Any],
    spec: PermutationSpec | None = None,
    apply_fn: ApplyFn | None = None,
    batches: Iterable[Any] | None = None,
    *,
    recompute_bn_stats: bool = True,
) -> Any:
    """Plain weight averaging, no matching (the baseline MuDSC and ZipIt improve on)."""
    trees = list(trees)
    check_same_structure(trees)
    spec = spec or PermutationSpec(())
    validate_spec(spec, trees[0])
    transforms = {g.name: identity_transform(g.size, len(trees)) for g in spec.groups}
    return _finish(trees, spec, transforms, apply_fn, _as_list(batches), recompute_bn_stats)


def permute_merge(
    trees: Sequence[Any],
    spec: PermutationSpec,
    apply_fn: ApplyFn | None = None,
    batches: Iterable[Any] | None = None,
    *,
    method: str = "mudsc",
    **options: Any,
) -> Any:
    """Entry point: merge K >= 2 variables trees with `method` in METHODS ("mudsc", "weight_matching",
    "activation_align", "zipit", "average"); `options` go to that function (e.g. mode, alpha)."""
    functions = {
        "mudsc": mudsc,
        "weight_matching": weight_matching,
        "activation_align": activation_align,
        "zipit": zipit,
        "average": average,
    }
    if method not in functions:
        raise MergeInputError(f"unknown permutation merge method {method!r}; expected one of {METHODS}")
    function = functions[method]
    try:
        inspect.signature(function).bind(trees, spec, apply_fn, batches, **options)
    except TypeError as error:
        raise MergeInputError(f"bad options for {method}: {error}") from error
    return function(trees, spec, apply_fn, batches, **options)
