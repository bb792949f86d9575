"""A leaf larger than the memory budget is merged in row blocks (`Chunk.block_rows`, the rule's `RowBlocks`)
with the result of the whole leaf: DARE's and DELLA's draws are keyed per row of the leaf and their L1
rescaling reads the whole leaf's norms, summed over the blocks first; karcher's coefficients come from the
Gram matrix summed over the blocks (issue 27, the memory budget)."""

import jax.numpy as jnp
import numpy as np
import pytest

import drm_jax
from drm_jax.engine.merge import merge_leaves
from drm_jax.math.interpolate import karcher_coefficients, karcher_mean

# (K + 1) * 48 * 4 = 768 bytes per row of "w" (64, 48): blocks of 20000 // 4 // 768 = 6 rows, the last of 4;
# 640 bytes per row of the kernel, (56, 40) in (out, in) orientation: blocks of 7 rows
BUDGET = 20000
CASES = [
    ("dare_ties", dict(density=0.3, seed=1, rescale_rule="l1")),
    ("dare_ties", dict(density=0.3, seed=1, rescale_rule="inverse")),
    ("dare_linear", dict(density=0.4, seed=5, rescale_rule="l1")),
    ("della", dict(density=0.5, epsilon=0.1, seed=2)),
    ("della_linear", dict(density=0.5, epsilon=0.2, seed=3, rescale_rule="inverse")),
    ("karcher", {}),
    ("karcher", dict(max_iter=2, tol=1e-3)),
]


def _trees(k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    # "w" stored (out, in); "dense.kernel" stored (in, out) (a Flax kernel: its rows are stored columns);
    # "b" 1-D, never cut
    base = {"w": rng.standard_normal((64, 48)).astype(np.float32),
            "dense": {"kernel": rng.standard_normal((40, 56)).astype(np.float32)},
            "b": rng.standard_normal(48).astype(np.float32)}
    models = [{"w": base["w"] + 0.1 * rng.standard_normal((64, 48)).astype(np.float32),
               "dense": {"kernel": base["dense"]["kernel"] + 0.1 * rng.standard_normal((40, 56)).astype(np.float32)},
               "b": base["b"] + 0.1 * rng.standard_normal(48).astype(np.float32)} for _ in range(k)]
    return base, models


def _flat(tree):
    return {"w": tree["w"], "dense.kernel": tree["dense"]["kernel"], "b": tree["b"]}


def _tolerance(method):
    # weights near 1, deltas near 0.1: a few float32 steps of the weights (base + merged delta rounds there)
    return dict(rtol=2e-5, atol=2e-6) if method == "karcher" else dict(rtol=1e-6, atol=5e-7)


@pytest.mark.parametrize("method, params", CASES)
def test_streamed_row_blocks_equal_the_whole_leaf(method, params):
    base, models = _trees()
    whole = _flat(drm_jax.merge(base, models, method=method, max_group_bytes=None, **params))
    # the plan cuts both 2-D leaves into blocks, in (out, in) orientation
    prepared = drm_jax.prepare(base, models, method=method, max_group_bytes=BUDGET, **params)
    cut = {prepared.names[c.members[0]]: c.block_rows for c in prepared.plan.chunks}
    assert cut == {"w": 6, "dense.kernel": 7, "b": 0}, cut
    flat_base, flat_models = _flat(base), [_flat(m) for m in models]
    names = list(flat_base)
    streamed = {}
    merge_leaves(names, [flat_base[n].shape for n in names], [flat_base[n].dtype for n in names],
                 get_base=lambda i: flat_base[names[i]], get_model=lambda t, i: flat_models[t][names[i]],
                 put=lambda i, x: streamed.__setitem__(names[i], np.asarray(x)), num_models=len(models),
                 method=method, max_group_bytes=BUDGET, **params)
    in_memory = _flat(prepared.merge())
    for name in names:
        want = np.asarray(whole[name])
        for got in (streamed[name], np.asarray(in_memory[name])):
            assert got.shape == want.shape and got.dtype == want.dtype
            # the same entries dropped (the draws do not depend on the cut), the same values up to the
            # order of the sums over the blocks
            np.testing.assert_array_equal(got == flat_base[name], want == flat_base[name])
            np.testing.assert_allclose(got, want, **_tolerance(method), err_msg=f"{method} {name}")


def test_dare_draws_do_not_depend_on_the_budget():
    base, models = _trees(k=2, seed=4)
    outs = [_flat(drm_jax.merge(base, models, method="dare_ties", density=0.5, seed=7, rescale_rule="inverse",
                                max_group_bytes=budget)) for budget in (None, 4000, 12000, BUDGET)]
    for out in outs[1:]:
        for name in out:
            np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(outs[0][name]))


@pytest.mark.parametrize("case", ["random", "one_zero", "one_model", "all_zero", "nearly_parallel", "opposite"])
def test_karcher_coefficients_give_karcher_mean(case):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 200))
    if case == "one_zero":
        x[1] = 0
    elif case == "one_model":
        x = x[:1]
    elif case == "all_zero":
        x[:] = 0
    elif case == "nearly_parallel":
        x = x[0] + 1e-3 * x
    elif case == "opposite":
        x[1] = -x[0]
    k = x.shape[0]
    alphas = np.full(k, 1 / k)
    for max_iter, tol in ((10, 1e-5), (2, 1e-3), (0, 1e-5)):
        want = np.asarray(karcher_mean(jnp.asarray(x, jnp.float32), jnp.asarray(alphas, jnp.float32), max_iter, tol))
        a = karcher_coefficients(x @ x.T, alphas, max_iter, tol)
        got = a @ x
        scale = max(np.max(np.abs(want)), 1e-30)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale, err_msg=f"{case} {max_iter} {tol}")
