"""The parts: Pearson similarities, Hungarian / block / ZipIt matching, merge arithmetic, BatchNorm
statistics, spec validation."""

from __future__ import annotations

import copy

import flax.linen as nn
import jax
import numpy as np
import pytest

from drm_jax.errors import MergeInputError
from drm_jax.permute import (
    AxisMember,
    PermGroup,
    PermutationSpec,
    merge_variables,
    mlp_spec,
    mudsc,
    recompute_batch_stats,
)
from drm_jax.permute.apply import permutation_transform, split_unmerge
from drm_jax.permute.matching import block_hungarian, cluster_score, hungarian, zip_greedy
from drm_jax.permute.similarity import Moments, activation_moments, pearson_from_moments, pearson_rows


def test_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) * np.arange(1, 7) + 3.0
    np.testing.assert_allclose(pearson_rows(x.T), np.corrcoef(x.T), atol=1e-12)
    np.testing.assert_allclose(pearson_from_moments(len(x), x.sum(0), x.T @ x), np.corrcoef(x.T), atol=1e-10)
    # a constant unit correlates 0 with everything instead of NaN
    x[:, 2] = 1.0
    corr = pearson_from_moments(len(x), x.sum(0), x.T @ x)
    assert np.all(np.isfinite(corr)) and np.all(corr[2] == 0)


def test_activation_moments_accumulate_over_batches_in_float64(case_factory):
    case = case_factory("mlp")
    trees = [case.init(0), case.init(7)]
    split = activation_moments(trees, case.spec, case.apply, case.batches)
    whole = activation_moments(trees, case.spec, case.apply, [np.concatenate(case.batches)])
    for name in case.spec.names:
        assert isinstance(split[name], Moments) and split[name].outer.dtype == np.float64
        assert split[name].count == whole[name].count == len(case.x)
        np.testing.assert_allclose(split[name].correlation(), whole[name].correlation(), atol=1e-6)
        width = case.spec.group(name).size
        assert split[name].outer.shape == (2 * width, 2 * width)


def test_hungarian_recovers_a_permutation():
    rng = np.random.default_rng(1)
    perm = rng.permutation(7)
    sim = rng.uniform(0, 0.5, size=(7, 7))
    sim[np.arange(7), perm] = 1.0
    np.testing.assert_array_equal(hungarian(sim), perm)


def test_block_hungarian_moves_whole_blocks_and_shares_them():
    rng = np.random.default_rng(2)
    blocks, sizes = 3, (2, 4)
    block_perm = np.array([2, 0, 1])
    sims, truths = [], []
    for size in sizes:
        n = blocks * size
        truth = np.concatenate([b * size + rng.permutation(size) for b in block_perm])
        sim = rng.uniform(0, 0.3, size=(n, n))
        sim[np.arange(n), truth] = 1.0
        sims.append(sim)
        truths.append(truth)
    # an isolated unit pair that would lure a free Hungarian across blocks must not split a block
    sims[0][0, 1] = 5.0
    found = block_hungarian(sims, sizes)
    for perm, truth, size in zip(found, truths, sizes):
        assert np.array_equal(perm.reshape(blocks, size) // size, np.repeat(block_perm[:, None], size, axis=1))
    np.testing.assert_array_equal(found[1], truths[1])


def test_zip_greedy_merges_most_similar_pairs_and_respects_budget():
    # model A units a0, a1; model B units b0, b1; b0 ~ a1, b1 ~ a0; a0 ~ a1 slightly less
    sim = np.array(
        [
            [1.0, 0.7, 0.1, 0.9],
            [0.7, 1.0, 0.95, 0.2],
            [0.1, 0.95, 1.0, 0.3],
            [0.9, 0.2, 0.3, 1.0],
        ]
    )
    unmerge = zip_greedy(sim, num_models=2, alpha=0.5, beta=1.0)
    clusters = sorted(tuple(np.flatnonzero(unmerge[:, c])) for c in range(unmerge.shape[1]))
    assert clusters == [(0, 3), (1, 2)]
    # within-model similarity dominates: the budget (1 merge per model) allows one within-model merge
    sim_within = np.array(
        [
            [1.0, 0.99, 0.1, 0.1],
            [0.99, 1.0, 0.1, 0.1],
            [0.1, 0.1, 1.0, 0.98],
            [0.1, 0.1, 0.98, 1.0],
        ]
    )
    clusters = sorted(tuple(np.flatnonzero(c)) for c in zip_greedy(sim_within, 2, 0.5, 1.0).T)
    assert clusters == [(0, 1), (2, 3)]
    clusters = sorted(tuple(np.flatnonzero(c)) for c in zip_greedy(sim_within, 2, 0.5, 1e-3).T)
    assert all(a < 2 <= b for a, b in clusters)  # no budget: only cross-model pairs


def test_cluster_score_is_the_alignment_objective():
    rng = np.random.default_rng(3)
    sim = rng.uniform(-1, 1, size=(10, 10))
    sim = (sim + sim.T) / 2
    perm = rng.permutation(5)
    stacked = np.concatenate(permutation_transform([np.arange(5), perm]).unmerge, axis=0)
    assert cluster_score(sim, stacked) == pytest.approx(sim[np.arange(5), 5 + perm].sum())


def test_merge_is_average_of_aligned_weights_by_hand():
    rng = np.random.default_rng(4)
    trees = [
        {"params": {"l0": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)},
                    "l1": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=2)}}}
        for _ in range(2)
    ]
    originals = copy.deepcopy(trees)
    spec = mlp_spec(trees[0], layers=["l0", "l1"])
    perm = np.array([2, 0, 3, 1])
    merged = merge_variables(trees, spec, {"l0.out": permutation_transform([np.arange(4), perm])})
    a, b = trees[0]["params"], trees[1]["params"]
    np.testing.assert_allclose(merged["params"]["l0"]["kernel"], (a["l0"]["kernel"] + b["l0"]["kernel"][:, perm]) / 2)
    np.testing.assert_allclose(merged["params"]["l0"]["bias"], (a["l0"]["bias"] + b["l0"]["bias"][perm]) / 2)
    np.testing.assert_allclose(merged["params"]["l1"]["kernel"], (a["l1"]["kernel"] + b["l1"]["kernel"][perm]) / 2)
    np.testing.assert_allclose(merged["params"]["l1"]["bias"], (a["l1"]["bias"] + b["l1"]["bias"]) / 2)
    # zip: A's units 0 and 1 zipped together, B's units 2, 3 zipped; merged width stays 4
    unmerge = np.zeros((8, 4))
    unmerge[[0, 1], 0] = 1
    unmerge[[2, 4], 1] = 1
    unmerge[[3, 5], 2] = 1
    unmerge[[6, 7], 3] = 1
    zipped = merge_variables(trees, spec, {"l0.out": split_unmerge(unmerge, 2)})
    np.testing.assert_allclose(zipped["params"]["l0"]["bias"][0], (a["l0"]["bias"][0] + a["l0"]["bias"][1]) / 2)
    # consumer side: the merged unit feeds every member's column, averaged over the models
    np.testing.assert_allclose(zipped["params"]["l1"]["kernel"][0], (a["l1"]["kernel"][0] + a["l1"]["kernel"][1]) / 2)
    for tree, original in zip(trees, originals):
        for x, y in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(original)):
            np.testing.assert_array_equal(x, y)  # inputs untouched


class _DenseBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=True, name="bn0")(nn.Dense(3, name="d0")(x))
        return nn.BatchNorm(use_running_average=True, name="bn1")(nn.Dense(2, name="d1")(nn.relu(h)))


def test_recompute_batch_stats_gives_population_statistics():
    model = _DenseBN()
    rng = np.random.default_rng(5)
    batches = [rng.normal(size=(16, 4)).astype(np.float32) for _ in range(3)]
    variables = model.init(jax.random.PRNGKey(0), batches[0])
    fresh = recompute_batch_stats(variables, model.apply, batches)
    p = variables["params"]
    h = [np.asarray(b) @ np.asarray(p["d0"]["kernel"]) + np.asarray(p["d0"]["bias"]) for b in batches]
    allh = np.concatenate(h)
    np.testing.assert_allclose(fresh["batch_stats"]["bn0"]["mean"], allh.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fresh["batch_stats"]["bn0"]["var"], allh.var(0), rtol=1e-4, atol=1e-6)
    # the second BatchNorm sees the first one normalized with each batch's statistics (training mode)
    z = []
    for hb in h:
        nb = (hb - hb.mean(0)) / np.sqrt(hb.var(0) + 1e-5)
        nb = nb * np.asarray(p["bn0"]["scale"]) + np.asarray(p["bn0"]["bias"])
        z.append(np.maximum(nb, 0) @ np.asarray(p["d1"]["kernel"]) + np.asarray(p["d1"]["bias"]))
    np.testing.assert_allclose(fresh["batch_stats"]["bn1"]["mean"], np.concatenate(z).mean(0), rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(variables["batch_stats"]["bn0"]["var"]) == 1.0)  # input untouched


def test_spec_validation_names_the_problem(case_factory):
    case = case_factory("mlp")
    good = case.spec.groups[0]
    wrong_size = PermutationSpec((PermGroup(good.name, good.size + 1, good.members),))
    with pytest.raises(MergeInputError, match="carry"):
        mudsc([case.variables, case.variables], wrong_size, alpha=1.0)
    missing = PermutationSpec((PermGroup("g", good.size, (AxisMember(("params", "nope", "kernel"), (1,), "out"),)),))
    with pytest.raises(MergeInputError, match="params/nope/kernel"):
        mudsc([case.variables, case.variables], missing, alpha=1.0)
    twice = PermutationSpec((good, PermGroup("again", good.size, good.members[:1])))
    with pytest.raises(MergeInputError, match="already claimed"):
        mudsc([case.variables, case.variables], twice, alpha=1.0)
    other = case.init(3)
    other["params"]["Dense_0"]["kernel"] = np.zeros((2, 2), np.float32)
    with pytest.raises(MergeInputError, match="Dense_0/kernel"):
        mudsc([case.variables, other], case.spec, alpha=1.0)
    bad = case.init(3)
    bad["params"]["Dense_1"]["bias"] = np.full_like(bad["params"]["Dense_1"]["bias"], np.nan)
    with pytest.raises(MergeInputError, match="NaN"):
        mudsc([case.variables, bad], case.spec, alpha=1.0)
