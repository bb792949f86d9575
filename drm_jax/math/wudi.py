"""WUDI merging: a data-free merged task vector found by Adam on a quadratic loss (docs/methods.md#wudi).

For one layer's task vectors tau_t (n x m, the layout of the weight itself: out x in for a torch Linear),
the merged task vector tau minimizes

    L(tau) = sum_t ||(tau - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2

by Adam (betas 0.9, 0.999, eps 1e-8, no weight decay) from tau = sum_t tau_t. L is quadratic, so its
gradient is linear in tau and needs each task's Gram matrix only, computed once before the loop:

    grad L(tau) = 2 (tau A - B),   A = sum_t tau_t^T tau_t / ||tau_t||^2 (m x m),
                                   B = sum_t tau_t tau_t^T tau_t / ||tau_t||^2 (n x m).

Each step is then one (n x m) @ (m x m) product (A and B are formed once, through K squares of side
min(n, m)). When m is large against K n (m > 2 K n) the same gradient is cheaper as
sum_t ((tau - tau_t) tau_t^T) tau_t / ||tau_t||^2, K products through n x n; which one runs is chosen
from the static shapes, and the result is the same up to rounding.

The step count `iter_num` and `learning_rate` are traced: the loop is `lax.fori_loop` with a traced trip
count (a while loop), so a new count or rate runs the same compiled program. Pure and vmappable: vmap
over a leading layer axis L to merge a stack of same-shaped layers in one program.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

# FusionBench's WUDI config: 400 Adam steps at learning rate 1e-5 (its function's own default is 300).
DEFAULT_ITER_NUM = 400
DEFAULT_LEARNING_RATE = 1e-5


def wudi_loss(tau: Float[Array, "n m"], task_vectors: Float[Array, "K n m"]) -> Float[Array, ""]:
    """L(tau) = sum_t ||(tau - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2; a task vector of norm 0 adds 0."""
    sq_norms = jnp.sum(jnp.square(task_vectors), axis=(1, 2))
    interference = jnp.matmul(tau[None] - task_vectors, jnp.swapaxes(task_vectors, 1, 2))
    per_task = jnp.sum(jnp.square(interference), axis=(1, 2))
    return jnp.sum(jnp.where(sq_norms > 0, per_task / jnp.where(sq_norms > 0, sq_norms, 1), 0))


def _inverse_sq_norms(task_vectors: Float[Array, "K n m"]) -> Float[Array, "K"]:
    # 1 / ||tau_t||^2, and 0 for a zero task vector: its loss term is 0 whatever tau is (FusionBench
    # divides 0 by 0 there and gets NaN).
    sq_norms = jnp.sum(jnp.square(task_vectors), axis=(1, 2))
    return jnp.where(sq_norms > 0, 1 / jnp.where(sq_norms > 0, sq_norms, 1), 0)


def uses_gram_form(k: int, n: int, m: int) -> bool:
    """Whether the gradient goes through the m x m Gram sum (n m^2 per step) rather than through each
    task's n x n products (2 K n^2 m per step)."""
    return m <= 2 * k * n


class WudiTerms(NamedTuple):
    """What WUDI's gradient needs, computed once from the task vectors (the part of the merge that does not
    depend on `iter_num` or `learning_rate`; a sweep over them keeps it).

    start: (n, m) sum_t tau_t, Adam's starting point.
    Gram form (`uses_gram_form`): left = A (m, m), right = B (n, m); grad L(tau) = 2 (tau A - B).
    Product form: left = the task vectors (K, n, m), right = each divided by its squared norm (K, n, m);
      grad L(tau) = 2 sum_t ((tau - tau_t) tau_t^T) tau_t / ||tau_t||^2.
    Which form a terms value holds follows from the rank of `left` (2: Gram form).
    """

    start: Array
    left: Array
    right: Array


_HIGHEST = jax.lax.Precision.HIGHEST


def wudi_terms(task_vectors: Float[Array, "K n m"]) -> WudiTerms:
    """The loop-invariant terms of one layer's gradient (vmappable over a leading layer axis)."""
    k, n, m = task_vectors.shape
    inv = _inverse_sq_norms(task_vectors)
    hi = _HIGHEST
    weighted = task_vectors * inv[:, None, None]
    start = jnp.sum(task_vectors, axis=0)
    if not uses_gram_form(k, n, m):
        return WudiTerms(start, task_vectors, weighted)
    a = jnp.einsum("kni,knj->ij", weighted, task_vectors, precision=hi)
    # B through the smaller of the per-task squares: tau_t (tau_t^T tau_t) or (tau_t tau_t^T) tau_t
    if m <= n:
        grams = jnp.einsum("kni,knj->kij", task_vectors, task_vectors, precision=hi)
        b = jnp.einsum("kni,kij->nj", weighted, grams, precision=hi)
    else:
        outer = jnp.einsum("kim,kjm->kij", weighted, task_vectors, precision=hi)
        b = jnp.einsum("kij,kjm->im", outer, task_vectors, precision=hi)
    return WudiTerms(start, a, b)


def wudi_gradient(terms: WudiTerms, tau: Float[Array, "n m"]) -> Float[Array, "n m"]:
    """grad L at tau from the terms of `wudi_terms`."""
    hi = _HIGHEST
    if terms.left.ndim == 2:
        return 2 * (jnp.matmul(tau, terms.left, precision=hi) - terms.right)
    task_vectors, weighted = terms.left, terms.right
    interference = jnp.einsum("nm,kpm->knp", tau, task_vectors, precision=hi) - jnp.einsum(
        "knm,kpm->knp", task_vectors, task_vectors, precision=hi)
    return 2 * jnp.einsum("knp,kpm->nm", interference, weighted, precision=hi)


def wudi_gradient_fn(task_vectors: Float[Array, "K n m"]):
    """grad L as a function of tau, with everything that does not depend on tau computed once."""
    terms = wudi_terms(task_vectors)
    return lambda tau: wudi_gradient(terms, tau)


def wudi_steps(terms: WudiTerms, iter_num=DEFAULT_ITER_NUM, learning_rate=DEFAULT_LEARNING_RATE
               ) -> Float[Array, "n m"]:
    """Adam's `iter_num` steps at `learning_rate` (both may be traced) from `terms.start`: the merged
    task vector, in the dtype of the terms."""
    import optax  # here, not at the top: it adds about 0.3 s to `import drm_jax` (the command line's start)

    optimizer = optax.adam(learning_rate)
    start = terms.start

    def step(_, carry):
        tau, state = carry
        updates, state = optimizer.update(wudi_gradient(terms, tau), state, tau)
        return optax.apply_updates(tau, updates), state

    tau, _ = jax.lax.fori_loop(0, jnp.asarray(iter_num, jnp.int32), step, (start, optimizer.init(start)))
    return tau.astype(start.dtype)


def wudi(task_vectors: Float[Array, "K n m"], iter_num=DEFAULT_ITER_NUM,
         learning_rate=DEFAULT_LEARNING_RATE) -> Float[Array, "n m"]:
    """The merged task vector of one 2-D weight by WUDI (docs/methods.md#wudi).

    task_vectors: (K, n, m), tau_t = W_t - W_base in the weight's own layout.
    iter_num: Adam steps (default 400, FusionBench's config), a Python int or a traced integer.
    learning_rate: Adam's step size (default 1e-5), traced.
    Returns tau (n, m) in the dtype of the task vectors; the merged weight is W_base + tau.
    """
    return wudi_steps(wudi_terms(task_vectors), iter_num, learning_rate).astype(task_vectors.dtype)
