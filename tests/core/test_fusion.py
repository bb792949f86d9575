"""An elementwise merge compiles to one fused pass: no (K, ...) stack of the task values is written.

XLA folds the engine's stack of per-task deltas back into the task sum's slices; a stage that works on the
whole stack at once before the sum (`scale_by_coefficients()` then `sum_tasks()`) made it write the (K, n, m)
product first, and task arithmetic ran 3 to 4x slower than the linear average on the same inputs
(bench_merge, issue 24). `weighted_sum()` takes the products inside the sum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drm_jax.math import mean
from drm_jax.math.state import chain, merge_deltas

K, N, M = 6, 512, 256


@pytest.mark.parametrize("name, transform", [
    ("task arithmetic", chain(mean.weighted_sum(), mean.scale(0.5))),
    ("weighted sum", mean.weighted_sum()),
    ("linear", mean.weighted_mean()),
    ("mean", mean.mean_tasks()),
])
def test_elementwise_merges_write_no_stack_of_the_tasks(name, transform):
    def merge(base, models, coefficients):
        deltas = jnp.stack([x - base for x in models])  # as the engine stacks them (engine/compiled.py)
        return base + merge_deltas(transform, deltas, coefficients)

    args = (jnp.zeros((N, M)), tuple(jnp.zeros((N, M)) for _ in range(K)), jnp.ones(K))
    temp = jax.jit(merge).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < N * M * 4, f"{name}: {temp} bytes of temporaries, a stack of the K tasks is {K * N * M * 4}"


def test_weighted_sum_equals_scale_then_sum_bit_for_bit():
    deltas = jnp.asarray(np.random.default_rng(0).standard_normal((K, 8, 5)), jnp.float32)
    c = jnp.asarray([0.3, -1.2, 0.7, 2.0, 0.0, 1e-3], jnp.float32)
    np.testing.assert_array_equal(merge_deltas(mean.weighted_sum(), deltas, c),
                                  merge_deltas(chain(mean.scale_by_coefficients(), mean.sum_tasks()), deltas, c))
