"""Interpolation and selection on weights: spherical interpolation, spherical means, model stock's ratio,
near-swap and Arcee fusion's importance mask (docs/methods.md#slerp and the sections after it).

Every function but `karcher_coefficients` (float64 NumPy on the host) is pure jax.numpy, traced in every number (t, weights, tolerances, iteration limits), with
no Python control flow on array values, so the engine can jit and vmap it over stacked layers. Inputs are
one leaf's arrays: `v0`, `v1`, `base` of the leaf's shape, `tensors` / `deltas` stacked on a leading model
axis (K, ...). Computation stays in the inputs' dtype (float32, or float64 under jax_enable_x64).

The conventions (thresholds, epsilons, fallbacks) are mergekit 0.1.5's, so that a merge through these
functions and one through mergekit agree to float32 rounding; the docs list them per method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

# -- slerp -----------------------------------------------------------------------------------------------
SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this: linear interpolation instead (nearly colinear tensors)
SLERP_EPS = 1e-8  # a norm at or below this is taken as 1 (a zero tensor is not divided by zero)


def _norm(x: Array, axis=None, keepdims: bool = False) -> Array:
    """The Euclidean norm, with gradient 0 (not NaN) at a zero vector: a frozen tensor (all deltas zero) keeps
    the gradients of everything else finite."""
    squares = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def _safe(x: Array, bad: Array) -> Array:
    """x, with 1 where `bad` (so a division on the branch jnp.where discards stays finite, gradients too)."""
    return jnp.where(bad, jnp.ones_like(x), x)


def slerp_coefficients(t, v0: Float[Array, "..."], v1: Float[Array, "..."],
                       dot_threshold: float = SLERP_DOT_THRESHOLD, eps: float = SLERP_EPS):
    """(c0, c1) with slerp(t, v0, v1) = c0 v0 + c1 v1 over the whole flattened tensors.

    cos = <v0 / n0, v1 / n1> clipped to [-1, 1], where n = ||v|| if ||v|| > eps else 1 (a zero tensor
    has cos = 0 with anything: theta = pi / 2). |cos| > dot_threshold: c = (1 - t, t); else, with
    theta = arccos(cos), c = (sin((1 - t) theta), sin(t theta)) / sin(theta).
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = _norm(a), _norm(b)
    na, nb = _safe(na, na <= eps), _safe(nb, nb <= eps)
    cos = jnp.clip(jnp.sum((a / na) * (b / nb)), -1.0, 1.0)
    linear = jnp.abs(cos) > dot_threshold
    theta = jnp.arccos(jnp.where(linear, jnp.zeros_like(cos), cos))
    sin = _safe(jnp.sin(theta), linear)
    t = jnp.asarray(t, cos.dtype)
    c0 = jnp.where(linear, 1 - t, jnp.sin((1 - t) * theta) / sin)
    c1 = jnp.where(linear, t, jnp.sin(t * theta) / sin)
    return c0, c1


def slerp(t, v0: Float[Array, "..."], v1: Float[Array, "..."], dot_threshold: float = SLERP_DOT_THRESHOLD,
          eps: float = SLERP_EPS) -> Float[Array, "..."]:
    """Spherical linear interpolation from v0 (t = 0) to v1 (t = 1), one angle for the whole tensor;
    linear interpolation for nearly colinear (or antipodal) tensors. Shape of v0."""
    c0, c1 = slerp_coefficients(t, v0, v1, dot_threshold, eps)
    return c0 * v0 + c1 * v1


# -- nuslerp ---------------------------------------------------------------------------------------------
NUSLERP_EPS = 1e-8  # colinear where 1 - cos^2 <= eps^2
NUSLERP_NORM_FLOOR = 1e-7  # vectors are divided by max(||v||, this)


def nuslerp_t(weights: Float[Array, " 2"]):
    """The interpolation factor of two weights: w1 / (w0 + w1), 0.5 where |w0 + w1| < 1e-6."""
    total = weights[0] + weights[1]
    small = jnp.abs(total) < 1e-6
    return jnp.where(small, 0.5, weights[1] / _safe(total, small))


def nuslerp(t, v0: Float[Array, "..."], v1: Float[Array, "..."], row_wise: bool = False, flatten: bool = True,
            eps: float = NUSLERP_EPS) -> Float[Array, "..."]:
    """Spherical interpolation of vectors of v0 and v1 (same shape), one angle per vector.

    flatten: the whole tensor is one vector. Otherwise the vectors lie along the last axis (each row of an
    (out, in) matrix), or along axis 0 with `row_wise` (each column: mergekit's name, kept). A 0-d tensor
    is one vector of length 1. Colinear vectors (1 - cos^2 <= eps^2, zero vectors excluded) interpolate
    linearly; a zero vector has cos = 0 with anything (theta = pi / 2). Shape of v0.
    """
    shape = v0.shape
    if flatten or v0.ndim == 0:
        x0, x1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        x0, x1 = jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1)
    else:
        x0, x1 = v0, v1

    def unit(x):
        return x / jnp.maximum(_norm(x, axis=-1, keepdims=True), NUSLERP_NORM_FLOOR)

    cos = jnp.clip(jnp.sum(unit(x0) * unit(x1), axis=-1, keepdims=True), -1.0, 1.0)
    colinear = (1 - jnp.square(cos)) <= eps ** 2
    theta = jnp.arccos(jnp.where(colinear, jnp.zeros_like(cos), cos))
    sin = _safe(jnp.sin(theta), colinear)
    t = jnp.asarray(t, cos.dtype)
    spherical = (jnp.sin((1 - t) * theta) * x0 + jnp.sin(t * theta) * x1) / sin
    out = jnp.where(colinear, (1 - t) * x0 + t * x1, spherical)
    if not flatten and v0.ndim and row_wise:
        out = jnp.swapaxes(out, 0, -1)
    return out.reshape(shape)


# -- multislerp ------------------------------------------------------------------------------------------
def multislerp(tensors: Float[Array, "K ..."], weights: Float[Array, " K"], normalize_weights: bool = True,
               eps=1e-8) -> Float[Array, "..."]:
    """Barycentric spherical interpolation of K tensors (each flattened to one vector).

    w = weights / sum(weights) if normalize_weights. u_k = x_k / (||x_k|| + eps); m = sum_k w_k u_k,
    normalised; the tangent vectors u_k - <u_k, m> m are averaged with w, mapped back to the sphere by
    the exponential map at m, and scaled by sum_k w_k ||x_k||. K = 1 returns the tensor itself. Where
    ||m|| < eps (antipodal tensors whose weights cancel, or all-zero tensors) the result is the weighted
    sum sum_k w_k x_k (mergekit does this for K = 2 and raises for K > 2). Shape of one tensor.
    """
    if tensors.shape[0] == 1:
        return tensors[0]
    k = tensors.shape[0]
    x = tensors.reshape(k, -1)
    w = jnp.asarray(weights, x.dtype)
    if normalize_weights:
        w = w / jnp.sum(w)
    eps = jnp.asarray(eps, x.dtype)
    norms = _norm(x, axis=1, keepdims=True)
    units = x / (norms + eps)
    mean = jnp.sum(units * w[:, None], axis=0)
    mean_norm = _norm(mean)
    degenerate = mean_norm < eps
    mean = mean / _safe(mean_norm, degenerate)
    tangents = units - jnp.sum(units * mean, axis=-1, keepdims=True) * mean
    tangent = jnp.sum(tangents * w[:, None], axis=0)
    tangent_norm = _norm(tangent) + eps
    # tangent_norm >= eps > 0 unless eps = 0 and the tangent vanishes
    safe_norm = _safe(tangent_norm, tangent_norm == 0)
    point = mean * jnp.cos(tangent_norm) + tangent * (jnp.sin(tangent_norm) / safe_norm)
    out = point * jnp.sum(norms[:, 0] * w)
    fallback = jnp.sum(x * w[:, None], axis=0)
    return jnp.where(degenerate, fallback, out).reshape(tensors.shape[1:])


# -- karcher ---------------------------------------------------------------------------------------------
def karcher_mean(tensors: Float[Array, "K ..."], alphas: Float[Array, " K"], max_iter=10, tol=1e-5
                 ) -> Float[Array, "..."]:
    """Weighted Karcher (Riemannian) mean of K tensors on the unit sphere, scaled by sum_k alpha_k ||x_k||.

    Tensors with ||x_k|| <= tol take no part in the direction (their alphas are renormalised away) but
    still count in the scale; if none is left the result is 0. The start is the normalised weighted mean
    of the unit vectors (the first valid unit vector where that mean is shorter than tol). Each of at most
    `max_iter` steps (a lax.while_loop: traced, and stopped early once the tangent is shorter than tol)
    maps the weighted tangent sum_k alpha_k theta_k / sin(theta_k) (u_k - cos_k m) back to the sphere
    (u_k at an angle theta_k < tol contribute nothing). K = 1 returns the tensor itself. Shape of one tensor.
    """
    if tensors.shape[0] == 1:
        return tensors[0]
    k = tensors.shape[0]
    x = tensors.reshape(k, -1)
    dtype = x.dtype
    alphas = jnp.asarray(alphas, dtype)
    tol = jnp.asarray(tol, dtype)
    norms = _norm(x, axis=1)
    units = x / _safe(norms, norms == 0)[:, None]  # a zero tensor's unit vector is 0
    valid = norms > tol
    valid_sum = jnp.sum(jnp.where(valid, alphas, 0))
    weights = jnp.where(valid, alphas, 0) / _safe(valid_sum, valid_sum == 0)
    start = jnp.sum(weights[:, None] * units, axis=0)
    start_norm = _norm(start)
    first_valid = units[jnp.argmax(valid)]
    mean0 = jnp.where(start_norm < tol, first_valid, start / _safe(start_norm, start_norm < tol))

    def step(carry):
        i, mean, _ = carry
        cos = jnp.clip(units @ mean, -1.0, 1.0)
        theta = jnp.arccos(cos)
        active = valid & (theta >= tol)
        sin = jnp.sin(theta)
        factor = jnp.where(active, weights * theta / _safe(sin, ~active), 0)
        tangent = jnp.sum(factor[:, None] * (units - cos[:, None] * mean), axis=0)
        tangent_norm = _norm(tangent)
        done = tangent_norm < tol
        moved = jnp.cos(tangent_norm) * mean + jnp.sin(tangent_norm) * (tangent / _safe(tangent_norm, done))
        moved_norm = _norm(moved)
        moved = jnp.where(moved_norm > tol, moved / _safe(moved_norm, moved_norm <= tol), moved)
        return i + 1, jnp.where(done, mean, moved), done

    def more(carry):
        i, _, done = carry
        return (i < max_iter) & ~done

    _, mean, _ = jax.lax.while_loop(more, step, (jnp.asarray(0, jnp.int32), mean0, jnp.asarray(False)))
    scale = jnp.sum(alphas * norms)
    out = jnp.where(jnp.any(valid), scale * mean, jnp.zeros_like(mean))
    return out.reshape(tensors.shape[1:])


def karcher_gram(tensors: Float[Array, "K ..."]) -> Float[Array, "K K"]:
    """The Gram matrix <x_i, x_j> of K tensors (or of one row block of them: summed over the blocks it is
    the whole tensors'), in float64 where enabled: all `karcher_coefficients` needs."""
    x = tensors.reshape(tensors.shape[0], -1).astype(jnp.float64)
    return x @ x.T


def karcher_coefficients(gram, alphas, max_iter=10, tol=1e-5):
    """a (K,) with `karcher_mean(tensors, alphas, max_iter, tol)` = sum_k a_k tensors_k, from their Gram
    matrix alone (`karcher_gram`), in float64 NumPy on the host.

    The mean never leaves the span of the unit vectors u_k = x_k / ||x_k||: it is held as coefficients c
    over them (mean = sum_k c_k u_k), dot products and norms come from the Gram matrix of the units, and
    every step of `karcher_mean` (the same start, tangent, step, renormalisation, stopping rule and
    fallbacks) is taken on c. So a tensor too large for memory is merged in row blocks: one pass sums the
    Gram matrix over the blocks, a second forms sum_k a_k x_k block by block.
    """
    g = np.asarray(gram, np.float64)
    k = g.shape[0]
    if k == 1:
        return np.ones(1)
    alphas = np.broadcast_to(np.asarray(alphas, np.float64), (k,))
    tol = float(tol)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    inv = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)  # a zero tensor's unit vector is 0
    units = g * inv[:, None] * inv[None, :]  # <u_i, u_j>

    def norm(c):
        return float(np.sqrt(max(c @ units @ c, 0.0)))

    valid = norms > tol
    valid_sum = float(np.sum(np.where(valid, alphas, 0.0)))
    weights = np.where(valid, alphas, 0.0) / (valid_sum if valid_sum != 0 else 1.0)
    start_norm = norm(weights)
    if start_norm < tol:
        mean = np.eye(k)[int(np.argmax(valid))]
    else:
        mean = weights / start_norm
    for _ in range(int(max_iter)):
        cos = np.clip(units @ mean, -1.0, 1.0)
        theta = np.arccos(cos)
        active = valid & (theta >= tol)
        sin = np.sin(theta)
        factor = np.where(active, weights * theta / np.where(active, sin, 1.0), 0.0)
        tangent = factor - np.sum(factor * cos) * mean
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        moved = np.cos(tangent_norm) * mean + np.sin(tangent_norm) * (tangent / tangent_norm)
        moved_norm = norm(moved)
        mean = moved / moved_norm if moved_norm > tol else moved
    if not np.any(valid):
        return np.zeros(k)
    return float(np.sum(alphas * norms)) * mean * inv


# -- model stock -----------------------------------------------------------------------------------------
def model_stock_ratio(deltas: Float[Array, "K ..."], filter_wise: bool = False) -> Float[Array, "..."]:
    """Model stock's interpolation ratio t = K cos / (1 + (K - 1) cos) from the offsets of K >= 2 models.

    cos is the mean over model pairs i < j of <d_i, d_j> / max(||d_i|| ||d_j||, 1e-6), each clipped to
    [-1, 1]. Over the whole flattened tensor (shape ()), or with `filter_wise` per vector along the last
    axis (shape of one delta without its last axis; one vector, shape (), for a 1-D or 0-d tensor).
    t = 0 (keep the base) where |1 + (K - 1) cos| < 1e-6.
    """
    k = deltas.shape[0]
    if filter_wise and deltas.ndim >= 3:
        x = deltas  # (K, ..., n): one vector per filter
    else:
        x = deltas.reshape(k, -1)
    norms = _norm(x, axis=-1)
    cos_sum = jnp.zeros(x.shape[1:-1], x.dtype)
    for i in range(k):
        for j in range(i + 1, k):
            dot = jnp.sum(x[i] * x[j], axis=-1)
            cos_sum = cos_sum + jnp.clip(dot / jnp.maximum(norms[i] * norms[j], 1e-6), -1.0, 1.0)
    cos = cos_sum / (k * (k - 1) // 2)
    denominator = 1 + (k - 1) * cos
    singular = jnp.abs(denominator) < 1e-6
    return jnp.where(singular, jnp.zeros_like(cos), k * cos / _safe(denominator, singular))


def model_stock_delta(deltas: Float[Array, "K ..."], filter_wise: bool = False) -> Float[Array, "..."]:
    """t mean_k(d_k): model stock's merged offset from the base (t from `model_stock_ratio`, broadcast over
    each filter's vector)."""
    t = model_stock_ratio(deltas, filter_wise)
    if t.ndim:
        t = t[..., None]
    return t * jnp.mean(deltas, axis=0)


# -- nearswap --------------------------------------------------------------------------------------------
def nearswap_weight(t, delta: Float[Array, "..."]) -> Float[Array, "..."]:
    """Per entry min(1, max(0, t / max(|delta|, 1e-6))): 1 where the model is within t of the base."""
    return jnp.clip(jnp.asarray(t, delta.dtype) / jnp.maximum(jnp.abs(delta), 1e-6), 0.0, 1.0)


# -- arcee fusion ----------------------------------------------------------------------------------------
FUSION_EPS = 1e-8  # added to both softmax distributions before the KL divergence


def _log1p_minus_identity(u: Array) -> Array:
    """log(1 + u) - u without the cancellation of the direct difference for small |u| (a series there)."""
    small = jnp.abs(u) < 0.1
    v = jnp.where(small, u, jnp.zeros_like(u))
    series = jnp.zeros_like(v)
    for n in range(10, 1, -1):  # -v^2/2 + v^3/3 - ... + v^10 / 10 (error below 1e-9 of the result)
        series = series * v + (-1.0) ** (n + 1) / n
    series = series * v * v
    direct = jnp.log1p(jnp.where(small, jnp.zeros_like(u), u)) - u
    return jnp.where(small, series, direct)


# Rows whose largest |delta| exceeds this take the direct formula: there the KL is large enough for the direct
# sum to be accurate (and 1 + g stays well away from 0 below it).
_FUSION_DIRECT_ABOVE = 1.0


def fusion_kl(base: Float[Array, "... n"], delta: Float[Array, "... n"]) -> Float[Array, "... 1"]:
    """KL(p || q) over the last axis, p = softmax(base + delta) + eps, q = softmax(base) + eps (eps =
    FUSION_EPS), without the cancellation of the direct sum.

    The direct sum of p log(p / q) loses about three digits in float32 (its first-order terms cancel:
    torch and XLA each get about 1e-3 relative error on fine-tuning-sized deltas). With s = softmax(base),
    z = sum_j s_j expm1(delta_j) and g_i = (expm1(delta_i) - z) / (1 + z) (so softmax(base + delta) =
    s (1 + g) exactly and sum_i s_i g_i = 0), q = s + eps, u = s g / q and p = q + s g:

        KL = sum_i p_i (log1p(u_i) - u_i) + sum_i s_i^2 g_i^2 / q_i

    (the identity sum_i p_i u_i = sum_i s_i^2 g_i^2 / q_i removes the cancelling terms), accurate to about
    1e-6 in float32. Rows with a |delta| above 1 use the direct sum (accurate there: the KL is not small).
    """
    s = jax.nn.softmax(base, axis=-1)
    big = jnp.max(jnp.abs(delta), axis=-1, keepdims=True) > _FUSION_DIRECT_ABOVE
    e = jnp.expm1(jnp.where(big, jnp.zeros_like(delta), delta))
    z = jnp.sum(s * e, axis=-1, keepdims=True)
    g = (e - z) / (1 + z)
    q = s + FUSION_EPS
    sg = s * g
    accurate = jnp.sum((q + sg) * _log1p_minus_identity(sg / q) + sg * sg / q, axis=-1, keepdims=True)
    p_direct = jax.nn.softmax(base + delta, axis=-1) + FUSION_EPS
    direct = jnp.sum(p_direct * jnp.log(p_direct / q), axis=-1, keepdims=True)
    return jnp.where(big, direct, accurate)


def fusion_importance(base: Float[Array, "..."], delta: Float[Array, "..."]) -> Float[Array, "..."]:
    """|delta| KL(softmax(model) + eps || softmax(base) + eps), the KL over the last axis (`fusion_kl`: one
    value per row, the whole vector for a 1-D tensor; a 0-d tensor is a vector of one). model = base +
    delta. Shape of base."""
    shape = base.shape
    b = base.reshape(1) if base.ndim == 0 else base
    d = delta.reshape(1) if delta.ndim == 0 else delta
    return (jnp.abs(d) * fusion_kl(b, d)).reshape(shape)


def fusion_mask(importance: Float[Array, "..."]) -> Bool[Array, "..."]:
    """importance >= median + 1.5 (q3 - q1), the quartiles read off the sorted entries at
    floor(q (n - 1)) (no interpolation). Exact over every entry (mergekit samples 10^6 entries, with
    replacement, of larger tensors)."""
    flat = jnp.sort(importance.reshape(-1))
    n = flat.shape[0]
    q1, median, q3 = flat[(n - 1) // 4], flat[(n - 1) // 2], flat[(3 * (n - 1)) // 4]
    return importance >= median + 1.5 * (q3 - q1)


def fusion_delta(base: Float[Array, "..."], delta: Float[Array, "..."]) -> Float[Array, "..."]:
    """Arcee fusion's merged offset: delta where its importance passes the dynamic threshold, else 0."""
    return jnp.where(fusion_mask(fusion_importance(base, delta)), delta, jnp.zeros_like(delta))


__all__ = ["FUSION_EPS", "NUSLERP_EPS", "SLERP_DOT_THRESHOLD", "SLERP_EPS", "fusion_delta", "fusion_importance",
           "fusion_kl", "fusion_mask", "karcher_coefficients", "karcher_gram", "karcher_mean", "model_stock_delta", "model_stock_ratio", "multislerp", "nearswap_weight",
           "nuslerp", "nuslerp_t", "slerp", "slerp_coefficients"]
