"""WUDI, RegMean / RegMean++, input Gram matrices and AdaMerging's learned coefficients
(drm_jax/math/wudi.py, drm_jax/math/regmean.py, drm_jax/learned.py; docs/methods.md#wudi, #regmean,
#regmean-plus-plus, #adamerging).

References are float64 numpy written from the papers; the optional agreement tests run FusionBench 0.2.33's
own functions where it is installed.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import drm_jax
from drm_jax.engine.tree import flatten
from drm_jax.errors import MergeInputError
from drm_jax.learned import regmean_merge, regmean_plusplus
from drm_jax.math.regmean import regmean
from drm_jax.math.wudi import uses_gram_form, wudi, wudi_gradient_fn, wudi_loss
from fusion_bench_files import FusionBenchUnavailable, load as load_fusion_bench
from core.test_prepare import counting_compiles

# (K, n, m): gradient through the m x m Gram sum (B formed through m x m, then n x n squares), and through
# each task's n x n products
WUDI_SHAPES = [(3, 5, 4), (3, 4, 6), (2, 2, 13)]


# ------------------------------------------------------------------------------------ float64 references

def ref_wudi(task_vectors: np.ndarray, iter_num: int, lr: float) -> np.ndarray:
    """The paper's / FusionBench's loop in float64: Adam (0.9, 0.999, 1e-8, bias-corrected, no weight
    decay) from sum_t tau_t on L = sum_t ||(tau - tau_t) tau_t^T||^2 / ||tau_t||^2, whose gradient
    2 sum_t (tau - tau_t) tau_t^T tau_t / ||tau_t||^2 is formed through the n x n products as autograd does."""
    tvs = np.asarray(task_vectors, np.float64)
    sq_norms = np.sum(tvs.reshape(len(tvs), -1) ** 2, axis=1)
    tau = tvs.sum(0)
    m, v = np.zeros_like(tau), np.zeros_like(tau)
    for step in range(1, iter_num + 1):
        grad = sum(2 * ((tau - t) @ t.T) @ t / s for t, s in zip(tvs, sq_norms))
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        tau = tau - lr * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
    return tau


def ref_regmean(kernels: np.ndarray, grams: np.ndarray, alpha: float) -> np.ndarray:
    """(sum_t G_t')^-1 sum_t G_t' W_t for kernels (K, in, out), G' = G with off-diagonals times alpha."""
    reduced = [g * (alpha + (1 - alpha) * np.eye(len(g))) for g in np.asarray(grams, np.float64)]
    return np.linalg.inv(sum(reduced)) @ sum(g @ w for g, w in zip(reduced, np.asarray(kernels, np.float64)))


def task_vectors(rng, k, n, m, scale=0.01):
    return (scale * rng.standard_normal((k, n, m))).astype(np.float32)


def grams_of(rng, k, d, rows=40):
    x = rng.standard_normal((k, rows, d)).astype(np.float32)
    return np.einsum("kri,krj->kij", x, x) / rows


@pytest.fixture(scope="module")
def fusion_bench():
    try:
        return load_fusion_bench()
    except FusionBenchUnavailable as err:
        pytest.skip(f"fusion-bench not importable: {err}")


# ------------------------------------------------------------------------------------ WUDI

@pytest.mark.parametrize("shape", WUDI_SHAPES)
def test_wudi_equals_the_float64_adam_loop(shape):
    assert uses_gram_form(*shape) == (shape != WUDI_SHAPES[-1])
    tvs = task_vectors(np.random.default_rng(0), *shape).astype(np.float64)
    want = ref_wudi(tvs, 7, 1e-3)
    with jax.enable_x64(True):
        for fn in (wudi, jax.jit(wudi)):
            got = np.asarray(fn(jnp.asarray(tvs), 7, 1e-3))
            assert got.dtype == np.float64
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-14)
    assert np.abs(want - tvs.sum(0)).max() > 1e-3  # the steps moved it: the comparison is not of the start


@pytest.mark.parametrize("shape", WUDI_SHAPES)
def test_wudi_gradient_is_the_gradient_of_its_loss(shape):
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        tvs = jnp.asarray(task_vectors(rng, *shape), jnp.float64)
        tau = jnp.asarray(rng.standard_normal(shape[1:]) * 0.01)
        np.testing.assert_allclose(wudi_gradient_fn(tvs)(tau), jax.grad(wudi_loss)(tau, tvs), rtol=1e-10)


def test_wudi_vmapped_over_layers_equals_each_layer():
    stack = task_vectors(np.random.default_rng(2), 6, 3, 5).reshape(2, 3, 3, 5)  # (L, K, n, m)
    got = jax.jit(jax.vmap(wudi, in_axes=(0, None, None)))(stack, 20, 1e-4)
    for layer in range(2):
        np.testing.assert_allclose(got[layer], wudi(stack[layer], 20, 1e-4), rtol=1e-6, atol=1e-9)


def test_a_zero_task_vector_changes_nothing():
    # its loss term is 0 for every tau (FusionBench would divide 0 by 0)
    tvs = task_vectors(np.random.default_rng(3), 2, 4, 3)
    with_zero = np.concatenate([tvs, np.zeros_like(tvs[:1])])
    np.testing.assert_allclose(wudi(with_zero, 30, 1e-4), wudi(tvs, 30, 1e-4), rtol=1e-6, atol=1e-10)


def test_a_sweep_of_steps_and_rates_compiles_nothing_new():
    tvs = task_vectors(np.random.default_rng(4), 3, 4, 6)
    merge = jax.jit(wudi)
    first = merge(tvs, 5, 1e-5)
    with counting_compiles() as count:
        results = [merge(tvs, steps, lr) for steps in (0, 3, 17) for lr in (1e-5, 3e-4)]
    assert count[0] == 0, f"{count[0]} new compilations over the sweep"
    np.testing.assert_array_equal(results[0], tvs.sum(0))  # 0 steps: the start, sum_t tau_t
    assert not np.allclose(results[-1], first)


@pytest.mark.parametrize("shape", [(4, 12, 9), (3, 6, 20), (2, 2, 13)])
def test_wudi_agrees_with_fusion_bench(fusion_bench, shape):
    """Float32 Adam on both sides; the gradients are rounded differently (Gram form here, autograd of
    the product form there), and Adam divides by the gradient's running scale, so entries agree to a few
    float32 ulps of tau plus 1e-3 of the largest move Adam can make (lr per step)."""
    torch = fusion_bench.torch
    tvs = task_vectors(np.random.default_rng(5), *shape)
    steps, lr = 40, 1e-5
    want = fusion_bench.wudi_merging([{"w": torch.from_numpy(t.copy())} for t in tvs], accelerator="cpu",
                                     iter_num=steps)["w"].detach().numpy()
    got = np.asarray(jax.jit(wudi)(tvs, steps, lr))
    tolerance = 4 * np.spacing(np.abs(want).max()) + 1e-3 * lr * steps
    assert np.abs(got - want).max() <= tolerance
    assert np.abs(want - tvs.sum(0)).max() > 0.5 * lr * steps  # both really moved


# ------------------------------------------------------------------------------------ RegMean

@pytest.mark.parametrize("alpha", [1.0, 0.95, 0.0])
def test_regmean_equals_the_closed_form(alpha):
    rng = np.random.default_rng(6)
    kernels = rng.standard_normal((3, 5, 4)).astype(np.float32)
    grams = grams_of(rng, 3, 5)
    want = ref_regmean(kernels, grams, alpha)
    for fn in (regmean, jax.jit(regmean)):
        np.testing.assert_allclose(fn(kernels, grams, alpha), want, rtol=2e-5, atol=1e-6)
    # torch's (out, in) layout: the same merge, transposed
    np.testing.assert_allclose(regmean(kernels.transpose(0, 2, 1), grams, alpha, input_axis=1), want.T,
                               rtol=2e-5, atol=1e-6)
    with jax.enable_x64(True):
        got = regmean(jnp.asarray(kernels, jnp.float64), jnp.asarray(grams, jnp.float64), alpha)
        np.testing.assert_allclose(got, want, rtol=1e-11)


def test_regmean_reproduces_each_model_on_its_own_inputs_best():
    # alpha = 1: the merged kernel minimizes sum_t ||X_t W - X_t W_t||^2, so that loss's gradient is 0 there
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((3, 30, 5)))
        kernels = jnp.asarray(rng.standard_normal((3, 5, 2)))
        merged = regmean(kernels, jnp.einsum("kri,krj->kij", x, x), 1.0)
        loss = lambda w: jnp.sum(jnp.square(jnp.einsum("kri,io->kro", x, w) - jnp.einsum("kri,kio->kro", x, kernels)))
        assert float(jnp.abs(jax.grad(loss)(merged)).max()) < 1e-9
        assert float(loss(merged)) < float(loss(jnp.mean(kernels, 0)))


def test_regmean_vmapped_over_layers_and_ratio_sweep_compile_once():
    rng = np.random.default_rng(8)
    kernels = rng.standard_normal((2, 3, 4, 3)).astype(np.float32)  # (L, K, in, out)
    grams = np.stack([grams_of(rng, 3, 4) for _ in range(2)])
    merge = jax.jit(jax.vmap(regmean, in_axes=(0, 0, None)))
    merge(kernels, grams, 0.9)
    with counting_compiles() as count:
        got = {alpha: merge(kernels, grams, alpha) for alpha in (0.0, 0.5, 0.95)}
    assert count[0] == 0
    for layer in range(2):
        np.testing.assert_allclose(got[0.5][layer], ref_regmean(kernels[layer], grams[layer], 0.5),
                                   rtol=2e-5, atol=1e-6)


def test_regmean_agrees_with_fusion_bench(fusion_bench):
    torch = fusion_bench.torch
    rng = np.random.default_rng(9)
    weights = rng.standard_normal((3, 4, 6)).astype(np.float32)  # torch Linear (out, in)
    bias = rng.standard_normal((3, 4)).astype(np.float32)
    grams = grams_of(rng, 3, 6)
    params = {"fc.weight": [torch.from_numpy(w.copy()) for w in weights],
              "fc.bias": [torch.from_numpy(b.copy()) for b in bias]}
    want = fusion_bench.merging_with_regmean_weights(params, [{"fc": torch.from_numpy(g.copy())} for g in grams],
                                                     reduce_non_diagonal_ratio=0.95)
    got = np.asarray(regmean(weights, grams, 0.95, input_axis=1))
    want_w = want["fc.weight"].numpy()
    assert np.abs(got - want_w).max() <= 1e-5 * np.abs(want_w).max()
    np.testing.assert_allclose(want["fc.bias"].numpy(), bias.mean(0), rtol=1e-6)  # other leaves: the mean


# ------------------------------------------------------------------------------------ Gram matrices, trees

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = nn.relu(nn.Dense(5)(x))  # Dense_0 (built first)
        return nn.Dense(3)(hidden)


def mlp_params(seed):
    return MLP().init(jax.random.PRNGKey(seed), jnp.zeros((1, 4)))


def apply_mlp(params, x):
    return MLP().apply(params, x)


def test_input_grams_are_x_transpose_x_by_leaf_name():
    params = mlp_params(0)
    rng = np.random.default_rng(10)
    batches = [rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((2, 3, 4)).astype(np.float32)]
    x = np.concatenate([b.reshape(-1, 4) for b in batches]).astype(np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    hidden = np.maximum(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
    sums = drm_jax.input_grams(apply_mlp, params, batches, average=False)
    assert set(sums) == {"params.Dense_0.kernel", "params.Dense_1.kernel"} <= set(flatten(params).names)
    np.testing.assert_allclose(sums["params.Dense_0.kernel"], x.T @ x, rtol=1e-5)
    np.testing.assert_allclose(sums["params.Dense_1.kernel"], hidden.T @ hidden, rtol=1e-5, atol=1e-5)
    means = drm_jax.input_grams(apply_mlp, params, batches)
    np.testing.assert_allclose(means["params.Dense_0.kernel"], x.T @ x / len(x), rtol=1e-5)
    other = mlp_params(1)
    with counting_compiles() as count:  # the jitted pass is kept per apply_fn
        drm_jax.input_grams(apply_mlp, other, batches)
    assert count[0] == 0


def test_input_grams_of_a_model_without_dense_is_an_error():
    with pytest.raises(MergeInputError, match="no flax.linen.Dense"):
        drm_jax.input_grams(lambda p, x: x * p, 2.0, [np.ones((2, 2))])


def test_regmean_merge_of_trees_solves_kernels_and_averages_the_rest():
    models = [mlp_params(s) for s in (1, 2)]
    rng = np.random.default_rng(11)
    grams = [drm_jax.input_grams(apply_mlp, m, [rng.standard_normal((8, 4)).astype(np.float32)]) for m in models]
    merged = regmean_merge(models, grams, 0.95)
    for layer in ("Dense_0", "Dense_1"):
        name = f"params.{layer}.kernel"
        want = ref_regmean(np.stack([m["params"][layer]["kernel"] for m in models]),
                           np.stack([g[name] for g in grams]), 0.95)
        np.testing.assert_allclose(merged["params"][layer]["kernel"], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(merged["params"][layer]["bias"],
                                   np.mean([m["params"][layer]["bias"] for m in models], 0), rtol=1e-6)
    with pytest.raises(MergeInputError, match="not leaves"):
        regmean_merge(models, [{"params.nope.kernel": np.eye(4)}] * 2)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(4)(x))


def apply_block(params, x):
    return Block().apply(params, x)


def test_regmean_plusplus_takes_each_blocks_inputs_from_the_merged_blocks_before():
    k, rng = 2, np.random.default_rng(12)
    blocks = [[Block().init(jax.random.PRNGKey(10 * b + t), jnp.zeros((1, 4))) for t in range(k)] for b in range(2)]
    inputs = [[rng.standard_normal((16, 4)).astype(np.float32)] for _ in range(k)]
    merged = regmean_plusplus([apply_block, apply_block], blocks, inputs, 0.9)

    def arrays(block):
        p = block["params"]["Dense_0"]
        return np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)

    # float64 reference: block 0 from the inputs; block 1 from block 0's *merged* outputs
    streams = [np.asarray(s[0], np.float64) for s in inputs]
    for b in range(2):
        kernels, biases = zip(*(arrays(blocks[b][t]) for t in range(k)))
        want = ref_regmean(np.stack(kernels), np.stack([x.T @ x / len(x) for x in streams]), 0.9)
        np.testing.assert_allclose(arrays(merged[b])[0], want, rtol=1e-4, atol=1e-5)
        streams = [np.maximum(x @ want + np.mean(biases, 0), 0) for x in streams]
    # and plain RegMean (block 1's inputs from each model's own block 0) differs
    own = [np.maximum(inputs[t][0] @ arrays(blocks[0][t])[0] + arrays(blocks[0][t])[1], 0) for t in range(k)]
    plain = ref_regmean(np.stack([arrays(blocks[1][t])[0] for t in range(k)]),
                        np.stack([x.T @ x / len(x) for x in own]), 0.9)
    assert np.abs(plain - arrays(merged[1])[0]).max() > 1e-3


# ------------------------------------------------------------------------------------ AdaMerging

def tiny_prepared(seed=13, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = {"a": {"kernel": rng.standard_normal((3, 2)).astype(dtype)}, "b": rng.standard_normal(4).astype(dtype)}
    models = [jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(dtype), base) for _ in range(2)]
    return drm_jax.prepare(base, models, method="task_arithmetic")


def squared_distance(target):
    return lambda merged, batch: sum(jnp.sum(jnp.square(m - t)) for m, t in
                                     zip(jax.tree.leaves(merged), jax.tree.leaves(target)))


@pytest.mark.parametrize("granularity, optimum", [("task", np.array([0.7, -0.2])),
                                                   ("layer", np.array([[0.7, 0.1], [-0.2, 0.5]]))])
def test_adamerging_finds_the_optimum_of_a_quadratic(granularity, optimum):
    prepared = tiny_prepared()
    target = prepared.merge(coefficients=optimum)  # independent task vectors: the unique minimizer
    losses = []
    got, merged = drm_jax.adamerging(prepared, squared_distance(target), [None], granularity=granularity,
                                     optimizer=optax.adam(0.05), steps=300, on_step=lambda i, l: losses.append(l))
    assert got.shape == optimum.shape and len(losses) == 300
    np.testing.assert_allclose(got, optimum, atol=2e-3)
    np.testing.assert_allclose(merged["b"], target["b"], atol=5e-3)
    assert losses[-1] < 1e-3 * losses[0]


def test_adamerging_gradient_matches_central_differences():
    # one SGD step of size 1 moves c by -grad; the loss is AdaMerging's entropy on a tiny linear classifier
    rng = np.random.default_rng(14)
    with jax.enable_x64(True):
        prepared = tiny_prepared(dtype=np.float64)
        heads = [lambda p, x: x @ p["a"]["kernel"], lambda p, x: x @ p["a"]["kernel"] + p["b"][:2]]
        loss = drm_jax.entropy_loss(heads)
        batch = [rng.standard_normal((5, 3)), rng.standard_normal((5, 3))]
        start = np.array([[0.3, 0.4], [0.5, 0.2]])
        stepped, _ = drm_jax.adamerging(prepared, loss, [batch], granularity="layer", optimizer=optax.sgd(1.0),
                                        steps=1, init=start)
        grad = start - np.asarray(stepped)
        h, numeric = 1e-5, np.zeros_like(start)
        for index in np.ndindex(start.shape):
            e = np.zeros_like(start)
            e[index] = h
            numeric[index] = (loss(prepared.merge(coefficients=start + e), batch)
                              - loss(prepared.merge(coefficients=start - e), batch)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-10)
        assert np.abs(numeric).min() > 1e-4


def test_entropy_loss_is_the_mean_shannon_entropy():
    logits = [np.array([[0.0, 0.0], [5.0, -5.0]]), np.array([[1.0, 2.0, 3.0]])]
    loss = drm_jax.entropy_loss([lambda p, x: x, lambda p, x: x])

    def entropy(z):
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return -(p * np.log(p)).sum(-1).mean()

    np.testing.assert_allclose(loss(None, logits), np.mean([entropy(z) for z in logits]), rtol=1e-6)


def test_adamerging_relative_steps_stay_non_negative_and_bad_input_is_an_error():
    prepared = tiny_prepared()
    target = prepared.merge(coefficients=np.array([-1.0, 0.5]))  # optimum below zero for the first model
    got, _ = drm_jax.adamerging(prepared, squared_distance(target), [None], optimizer=optax.adam(0.1),
                                steps=60, relative=True)
    assert float(got[0]) == 0.0 and float(got[1]) > 0
    with pytest.raises(MergeInputError, match="granularity"):
        drm_jax.adamerging(prepared, squared_distance(target), [None], granularity="model")
    with pytest.raises(MergeInputError, match="init of shape"):
        drm_jax.adamerging(prepared, squared_distance(target), [None], init=np.ones(3), steps=1)
