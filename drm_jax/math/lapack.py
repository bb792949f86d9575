"""Thin SVD and reduced QR that are safe to batch on CPU (docs/methods.md#cpu-lapack).

jaxlib 0.10's CPU LAPACK kernels (SVD, QR, eigh, ...) split a batch of matrices over XLA's intra-op
thread pool and block a pool thread until the pieces are done (`ParallelBatchMap` in
jaxlib/cpu/lapack_kernels.cc). When as
many batched calls as the pool has threads run at once in one program (TSV-M's two polar factors, the
groups of a chunk, on a 2-core machine two are enough), every pool thread waits for work queued behind
it and the program never finishes: a hang in `block_until_ready`, with no CPU time used.

On CPU the functions below therefore never hand LAPACK a batch. A batch axis, whether the array's own
leading axes or a `jax.vmap` over the caller (the engine's layer axis), becomes a loop with one matrix
per call (`jax.custom_batching.sequential_vmap`, a `lax.map`), and a call on one matrix runs on its own
thread without waiting for the pool. On every other platform they are `jnp.linalg`'s batched calls,
unchanged (`lax.platform_dependent`). Values are those of `jnp.linalg`.

They serve the computations that run several decompositions side by side in one program: the subspace
family (TSV-M's two polar factors, Iso-CTS's, every group of a jitted `Prepared.merge`) through
`drm_jax.math.linalg`, and the factored LoRA cores (`drm_jax.math.lowrank`: the QRs of both factors).
DRM's joint space (`drm_jax.math.decompose`) keeps the batched call over the layer axis: each of its
programs runs one decomposition, and the engine's executors dispatch a decomposition program only
after the previous one has finished, on CPU, whatever `check_finite` is (`drm_jax.engine.executors.
decompose`, the scheduling rule tested in tests/core/test_executors.py), so one runs at a time and the
rest of the pool is free for its pieces.

On CPU the SVD of a matrix on which LAPACK's divide and conquer (gesdd) fails, which jaxlib reports as
NaN in every output, is computed again by the QR iteration (gesvd): a finite matrix gets a finite SVD
(docs/methods.md#cpu-lapack). `batched_svd`, DRM's one batched call, does the same for a whole batch.

Reverse-mode derivatives do not pass through these functions (a custom batching rule is not
transposable): they are called on primal values only, by the custom JVPs of `drm_jax.math.linalg` and
by code that is not differentiated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _one_at_a_time(matrix_fn, cpu_matrix_fn=None):
    """`matrix_fn` on (..., n, m): on CPU a sequential loop over the leading axes and over any vmap, each
    step `cpu_matrix_fn` (default `matrix_fn`) on one matrix."""
    looped = jax.custom_batching.sequential_vmap(cpu_matrix_fn or matrix_fn)

    def on_cpu(a):
        fn = looped
        for _ in range(a.ndim - 2):
            fn = jax.vmap(fn)
        return fn(a)

    @functools.wraps(matrix_fn)
    def decomposition(a):
        return jax.lax.platform_dependent(a, cpu=on_cpu, default=matrix_fn)

    return decomposition


def _divide_and_conquer(a):
    return tuple(jnp.linalg.svd(a, full_matrices=False))


def _svd_checked(a):
    """gesdd, and gesvd where gesdd failed: LAPACK's divide and conquer does not converge on some matrices
    (a well-conditioned float32 384 x 384 among them, docs/methods.md#cpu-lapack) and jaxlib then returns
    NaN in every output. The predicate covers every matrix of `a` and is a scalar, so the QR iteration
    runs only then (on the whole of `a`)."""
    u, s, vh = _divide_and_conquer(a)
    return jax.lax.cond(jnp.all(jnp.isfinite(s)), lambda: (u, s, vh),
                        lambda: tuple(jax.lax.linalg.svd(a, full_matrices=False,
                                                         algorithm=jax.lax.linalg.SvdAlgorithm.QR)))


def svd(a: Float[Array, "... n m"]) -> tuple[Array, Array, Array]:
    """Thin SVD: U (..., n, r), S (..., r) descending, Vh (..., r, m), r = min(n, m).

    On CPU a matrix on which divide and conquer fails is decomposed again by the QR iteration (a finite
    input then gives a finite SVD); elsewhere `jnp.linalg.svd`."""
    return _svd(a)


_svd = _one_at_a_time(_divide_and_conquer, _svd_checked)


@jax.custom_batching.custom_vmap
def _svd_checked_batch(a):
    return _svd_checked(a)


@_svd_checked_batch.def_vmap
def _svd_checked_batch_vmap(axis_size, in_batched, a):
    # a vmap adds a leading axis to the one batched call, and the check still covers the whole batch
    # (a lax.cond under a plain vmap would become a select that runs the QR iteration every time)
    if not in_batched[0]:
        a = jnp.broadcast_to(a, (axis_size, *a.shape))
    return _svd_checked_batch(a), (True, True, True)


@jax.custom_jvp
def batched_svd(a: Float[Array, "... n m"]) -> tuple[Array, Array, Array]:
    """`jnp.linalg.svd(a, full_matrices=False)` as one batched call over the leading axes and any vmap,
    for the programs that keep a batched decomposition (DRM's joint space: one decomposition program in
    flight, module docstring). On CPU, where divide and conquer fails on any matrix of the batch, the
    whole batch is decomposed again by the QR iteration. Derivatives: `jnp.linalg.svd`'s."""
    return jax.lax.platform_dependent(a, cpu=_svd_checked_batch, default=_divide_and_conquer)


@batched_svd.defjvp
def _batched_svd_jvp(primals, tangents):
    return jax.jvp(_divide_and_conquer, primals, tangents)


@_one_at_a_time
def qr(a: Float[Array, "... n m"]) -> tuple[Array, Array]:
    """Reduced QR: Q (..., n, k), R (..., k, m), k = min(n, m)."""
    return tuple(jnp.linalg.qr(a))


__all__ = ["batched_svd", "qr", "svd"]
