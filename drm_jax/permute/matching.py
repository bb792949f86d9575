"""Matching units from similarities: Hungarian alignment, two-level (block) alignment, ZipIt greedy zip.

All functions take float64 similarity matrices and return plain numpy index arrays or 0/1 membership
matrices; `drm_jax.permute.apply` turns them into transforms.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


def hungarian(similarity: np.ndarray) -> np.ndarray:
    """perm (n,) maximizing sum_i similarity[i, perm[i]] (rows: reference model, columns: the other)."""
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    perm = np.empty(similarity.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def block_hungarian(similarities: Sequence[np.ndarray], block_sizes: Sequence[int]) -> list[np.ndarray]:
    """Two-level assignment for groups that share one block permutation (attention heads, GroupNorm groups).

    similarities[g]: (n_g, n_g) with n_g = num_blocks * block_sizes[g]. For every pair of blocks (a, b)
    the units inside are matched by Hungarian in each group; the block pair's score is the sum of those
    optimal scores over the linked groups; blocks are then matched by Hungarian on the scores.
    Returns one perm per group, mapping whole blocks to whole blocks.
    """
    num_blocks = similarities[0].shape[0] // block_sizes[0]
    scores = np.zeros((num_blocks, num_blocks))
    inner: list[dict[tuple[int, int], np.ndarray]] = [{} for _ in similarities]
    for g, (sim, size) in enumerate(zip(similarities, block_sizes)):
        for a in range(num_blocks):
            for b in range(num_blocks):
                sub = sim[a * size : (a + 1) * size, b * size : (b + 1) * size]
                perm = hungarian(sub)
                inner[g][(a, b)] = perm
                scores[a, b] += sub[np.arange(size), perm].sum()
    block_perm = hungarian(scores)
    perms = []
    for g, size in enumerate(block_sizes):
        perms.append(np.concatenate([b * size + inner[g][(a, b)] for a, b in enumerate(block_perm)]))
    return perms


def zip_greedy(similarity: np.ndarray, num_models: int, alpha: float = 0.5, beta: float = 1.0) -> np.ndarray:
    """ZipIt! greedy matching (arXiv 2305.03053, Sec. 4.3) over the stacked units of `num_models` models.

    similarity: (K n, K n), block (a, b) compares model a's units with model b's.
    Repeatedly merges the most similar pair of current features, across models or within one, until n
    features remain. A merged feature's similarity to the others is the minimum of its two parents',
    times `alpha` (alpha <= 0 forbids merging a feature twice). Each model may merge at most
    int((K n - n) // K * beta) pairs of its own features ("beta" budget); once spent, its remaining
    within-model similarities are disabled.
    Returns the (K n, n) 0/1 membership matrix (unmerge; column c lists the units zipped into c).
    """
    total = similarity.shape[0]
    width = total // num_models
    sims = np.array(similarity, dtype=np.float64)
    np.fill_diagonal(sims, -np.inf)
    origin = np.repeat(np.arange(num_models), width)
    members: list[list[int]] = [[i] for i in range(total)]
    alive = np.ones(total, dtype=bool)
    budget = np.full(num_models, int((total - width) // num_models * beta + 1e-4))

    def disable_within(model: int) -> None:
        own = alive & (origin == model)
        sims[np.ix_(own, own)] = -np.inf

    for model in range(num_models):
        if budget[model] <= 0:
            disable_within(model)
    for _ in range(total - width):
        flat = int(np.argmax(sims))
        i, j = divmod(flat, total)
        if not np.isfinite(sims[i, j]):
            # nothing left that may be merged: every remaining budget is spent and features are isolated
            raise RuntimeError("ZipIt ran out of mergeable pairs; increase beta or alpha")
        i, j = min(i, j), max(i, j)
        same_model = origin[i] == origin[j]
        members[i].extend(members[j])
        merged = np.minimum(sims[i], sims[j])
        merged = merged * alpha if alpha > 0 else np.full_like(merged, -np.inf)
        sims[i, :] = merged
        sims[:, i] = merged
        sims[i, i] = -np.inf
        sims[j, :] = -np.inf
        sims[:, j] = -np.inf
        alive[j] = False
        if same_model:
            budget[origin[i]] -= 1
            if budget[origin[i]] <= 0:
                disable_within(int(origin[i]))
    unmerge = np.zeros((total, width))
    for column, index in enumerate(np.flatnonzero(alive)):
        unmerge[members[index], column] = 1.0
    return unmerge


def cluster_score(similarity: np.ndarray, unmerge: np.ndarray) -> float:
    """sum over merged units of the mean pairwise similarity of their members (0 for singletons).

    For two aligned models this is sum_i S[i, perm[i]], the alignment objective."""
    within = np.einsum("ic,ij,jc->c", unmerge, similarity, unmerge) - np.einsum("ic,ii->c", unmerge, similarity)
    sizes = unmerge.sum(axis=0)
    pairs = sizes * (sizes - 1)
    return float(np.sum(np.where(pairs > 0, within / np.maximum(pairs, 1), 0.0)))
