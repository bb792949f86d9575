"""Merging a model with a randomly permuted copy of itself returns exactly the original (MuDSC SPEC test)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from drm_jax.permute import (
    activation_align,
    average,
    mudsc,
    permute_variables,
    random_permutations,
    vit_spec,
    weight_matching,
    zipit,
)

CASES = ["mlp", "resnet_bn", "resnet_gn", "vit"]
METHODS = {
    "mudsc_align": lambda c, trees: mudsc(trees, c.spec, c.apply, c.batches),
    "mudsc_zip": lambda c, trees: mudsc(trees, c.spec, c.apply, c.batches, mode="zip"),
    "weight_matching": lambda c, trees: weight_matching(trees, c.spec, c.apply, c.batches),
    "activation_align": lambda c, trees: activation_align(trees, c.spec, c.apply, c.batches),
    "zipit": lambda c, trees: zipit(trees, c.spec, c.apply, c.batches),
}


def _permuted(case, seed=1):
    return permute_variables(case.variables, case.spec, random_permutations(case.spec, seed))


@pytest.mark.parametrize("name", CASES)
def test_permuted_copy_differs_but_computes_the_same(case_factory, name):
    case = case_factory(name)
    copy = _permuted(case)
    # every weight matrix/kernel is reordered (biases and norm scales may start constant)
    flat, _ = jax.tree_util.tree_flatten_with_path(case.variables)
    for (path, a), b in zip(flat, jax.tree_util.tree_leaves(copy)):
        if "kernel" in jax.tree_util.keystr(path):
            assert not np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
    np.testing.assert_allclose(case.apply(copy, case.x), case.apply(case.variables, case.x), atol=2e-5, rtol=1e-5)
    # averaging without matching mixes unrelated units: the function changes
    averaged = average([case.variables, copy], case.spec, case.apply, case.batches)
    assert not np.allclose(case.apply(averaged, case.x), case.apply(case.variables, case.x), atol=1e-3)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", CASES)
def test_merging_with_permuted_copy_returns_original(case_factory, trees_equal, name, method):
    case = case_factory(name)
    merged = METHODS[method](case, [case.variables, _permuted(case)])
    assert trees_equal(merged, case.variables)
    np.testing.assert_array_equal(case.apply(merged, case.x), case.apply(case.variables, case.x))


def test_three_models_with_two_permuted_copies(case_factory, trees_equal):
    case = case_factory("vit")
    trees = [case.variables, _permuted(case, seed=2), _permuted(case, seed=3)]
    assert trees_equal(mudsc(trees, case.spec, case.apply, case.batches), case.variables)
    # a unit must be zipped twice with K=3; zip_alpha=1 keeps the merged unit's similarity to the third copy
    zipped = mudsc(trees, case.spec, case.apply, case.batches, mode="zip", zip_alpha=1.0)
    assert trees_equal(zipped, case.variables)


def test_vit_heads_move_as_blocks(case_factory):
    case = case_factory("vit")
    perms = random_permutations(case.spec, seed=4)
    qk, vo = case.spec.group("block0.qk"), case.spec.group("block0.vo")
    head_dim = qk.block_size
    heads_qk = perms[qk.name].reshape(-1, head_dim) // head_dim
    heads_vo = perms[vo.name].reshape(-1, head_dim) // head_dim
    # every head's units come from one head, and query/key and value/output agree on which
    assert np.all(heads_qk == heads_qk[:, :1]) and np.array_equal(heads_qk, heads_vo)

    # swapping one unit between two heads in the query/key group alone breaks the function
    swap = np.arange(qk.size)
    swap[[0, head_dim]] = swap[[head_dim, 0]]
    broken = {qk.name: swap}
    copy = permute_variables(case.variables, case.spec, broken)
    assert not np.allclose(case.apply(copy, case.x), case.apply(case.variables, case.x), atol=1e-4)


def test_bare_params_trees_work_like_variables(case_factory, trees_equal):
    case = case_factory("vit")
    params = case.variables["params"]
    spec = vit_spec(params)
    assert all(m.path[0] != "params" for g in spec.groups for m in g.members)
    copy = permute_variables(params, spec, random_permutations(spec, seed=5))

    def apply(p, x):
        return case.apply({"params": p}, x)

    np.testing.assert_allclose(apply(copy, case.x), apply(params, case.x), atol=2e-5, rtol=1e-5)
    assert trees_equal(mudsc([params, copy], spec, apply, case.batches), params)
    assert trees_equal(weight_matching([params, copy], spec), params)
