"""MuDSC's alpha endpoints reproduce weight matching and activation alignment; the search improves the
objective; the entry point dispatches; BatchNorm statistics are recomputed."""

from __future__ import annotations

import numpy as np
import pytest

from drm_jax.errors import MergeInputError
from drm_jax.permute import (
    activation_align,
    average,
    match_units,
    mudsc,
    permute_merge,
    weight_matching,
    zipit,
)


@pytest.fixture(scope="module", params=["mlp", "resnet_bn", "vit"])
def pair(request, case_factory):
    """Two independently initialized models (different seeds: no shared base)."""
    case = case_factory(request.param)
    return case, [case.init(0), case.init(7)]


def test_alpha_one_without_activations_is_weight_matching(pair, trees_equal):
    case, trees = pair
    expected = weight_matching(trees, case.spec)
    assert trees_equal(mudsc(trees, case.spec, alpha=1.0), expected)
    # with data, alpha = 1 still ignores activations; the data only refills BatchNorm statistics
    assert trees_equal(
        mudsc(trees, case.spec, case.apply, case.batches, alpha=1.0),
        weight_matching(trees, case.spec, case.apply, case.batches),
    )
    assert not trees_equal(expected, average(trees, case.spec))


def test_alpha_zero_is_activation_alignment_and_zip_is_zipit(pair, trees_equal):
    case, trees = pair
    aligned = activation_align(trees, case.spec, case.apply, case.batches)
    assert trees_equal(mudsc(trees, case.spec, case.apply, case.batches, alpha=0.0), aligned)
    zipped = zipit(trees, case.spec, case.apply, case.batches)
    assert trees_equal(mudsc(trees, case.spec, case.apply, case.batches, alpha=0.0, mode="zip"), zipped)
    assert not trees_equal(aligned, zipped)


def test_search_beats_identity_and_is_seeded(pair, trees_equal):
    case, trees = pair
    identity = match_units(trees, case.spec, alpha=1.0, max_rounds=0)
    found = match_units(trees, case.spec, alpha=1.0)
    assert identity.rounds == 0 and found.rounds >= 1
    assert found.score > identity.score
    mixed = match_units(trees, case.spec, case.apply, case.batches, alpha=0.5, seed=3)
    again = match_units(trees, case.spec, case.apply, case.batches, alpha=0.5, seed=3)
    assert mixed.score == again.score
    for transform in mixed.transforms.values():
        for u in transform.unmerge:
            # alignment: each model's units go one-to-one onto merged units
            np.testing.assert_array_equal(u.sum(axis=0), 1.0)
            np.testing.assert_array_equal(u.sum(axis=1), 1.0)


def test_zip_budget_controls_within_model_merges(case_factory):
    case = case_factory("mlp")
    trees = [case.init(0), case.init(7)]
    free = match_units(trees, case.spec, case.apply, case.batches, mode="zip", alpha=0.0)
    none = match_units(trees, case.spec, case.apply, case.batches, mode="zip", alpha=0.0, zip_beta=1e-3)
    within_free = 0
    for name, transform in free.transforms.items():
        merge = transform.merge
        # a merged unit is the mean of its members: merge weights over all models sum to 1
        np.testing.assert_allclose(sum(m.sum(axis=1) for m in merge), 1.0)
        per_model = np.stack([u.sum(axis=0) for u in transform.unmerge])
        within_free += int(np.sum(per_model >= 2))
        # beta ~ 0: no budget for merging two units of one model, so every merged unit pairs A with B
        np.testing.assert_array_equal(
            np.stack([u.sum(axis=0) for u in none.transforms[name].unmerge]), np.ones_like(per_model)
        )
    assert within_free > 0


def test_entry_point_dispatches_and_rejects_bad_input(pair, trees_equal):
    case, trees = pair
    assert trees_equal(
        permute_merge(trees, case.spec, case.apply, case.batches, method="zipit"),
        zipit(trees, case.spec, case.apply, case.batches),
    )
    assert trees_equal(permute_merge(trees, case.spec, method="weight_matching"), weight_matching(trees, case.spec))
    with pytest.raises(MergeInputError, match="unknown"):
        permute_merge(trees, case.spec, method="ties")
    with pytest.raises(MergeInputError, match="bad options"):
        permute_merge(trees, case.spec, method="average", alpha=0.3)
    with pytest.raises(MergeInputError, match="alpha"):
        mudsc(trees, case.spec, case.apply, case.batches, alpha=1.5)
    with pytest.raises(MergeInputError, match="apply_fn and batches"):
        mudsc(trees, case.spec, alpha=0.5)
    with pytest.raises(MergeInputError, match="mode"):
        mudsc(trees, case.spec, case.apply, case.batches, mode="fuse")
    with pytest.raises(MergeInputError, match="at least two"):
        mudsc(trees[:1], case.spec, case.apply, case.batches)


def test_batch_norm_statistics_are_recomputed(case_factory):
    case = case_factory("resnet_bn")
    trees = [case.init(0), case.init(7)]
    kept = mudsc(trees, case.spec, case.apply, case.batches, recompute_bn_stats=False)
    fresh = mudsc(trees, case.spec, case.apply, case.batches)
    var_kept = np.asarray(kept["batch_stats"]["stage0_block0"]["norm2"]["var"])
    var_fresh = np.asarray(fresh["batch_stats"]["stage0_block0"]["norm2"]["var"])
    # averaging two unrelated (if aligned) units shrinks the variance the stored statistics assume
    assert not np.allclose(var_kept, var_fresh)
    np.testing.assert_array_equal(
        np.asarray(fresh["params"]["head"]["kernel"]), np.asarray(kept["params"]["head"]["kernel"])
    )
