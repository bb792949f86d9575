"""Float64 NumPy reference implementations written from ../shared/SPEC.md, step by step.

Deliberately naive (dense SVD with truncation by slicing, sorts, Python loops) and independent of
drm_jax's code, so that the compiled stages are checked against the text of the method, not against
themselves. Every function takes deltas D of shape (K, n, m) (or (K, ...) for the element-wise methods)
and returns the merged delta.
"""

from __future__ import annotations

import numpy as np


def _kthvalue_mask(mags: np.ndarray, k: int) -> np.ndarray:
    """Keep magnitudes >= the k-th smallest (1-based); k <= 0 keeps everything."""
    if k <= 0:
        return np.ones(mags.shape, bool)
    threshold = np.sort(mags.ravel())[k - 1]
    return mags >= threshold


def _elect_majority(x: np.ndarray) -> np.ndarray:
    """SPEC step 7: sign by mass, zero sums take the sign of the sum of signs; disagreeing entries zeroed."""
    s = np.sign(x.sum(axis=0))
    s[s == 0] = np.sign(s.sum())
    return np.where(np.sign(x) == s[None], x, 0.0)


def _disjoint_mean(x: np.ndarray) -> np.ndarray:
    return x.sum(axis=0) / np.maximum((x != 0).sum(axis=0), 1)


def drm_h(deltas, drop_rate=0.8, coefficients=None, renormalize=True, rank_rtol=0.01, per_task=False):
    """DRM-H, SPEC steps 1-9."""
    d = np.asarray(deltas, np.float64)
    k, n, m = d.shape
    lam = np.ones(k) if coefficients is None else np.asarray(coefficients, np.float64)
    big = np.concatenate(list(d), axis=1)  # (n, K m)
    u, s, vh = np.linalg.svd(big, full_matrices=False)
    r = int(np.sum(s > rank_rtol * s.max())) if s.size and s.max() > 0 else 0
    u, s, vh = u[:, :r], s[:r], vh[:r]
    blocks = np.stack([vh[:, t * m:(t + 1) * m] for t in range(k)])  # (K, r, m)
    if renormalize:
        c = np.linalg.norm(blocks, axis=2)  # (K, r)
        safe = np.where(c > 0, c, 1.0)
        blocks = np.where(c[:, :, None] > 0, blocks / safe[:, :, None], 0.0)
        s_t = s[None, :] * c
    else:
        s_t = np.broadcast_to(s[None, :], (k, r))
    keep = 1.0 - drop_rate
    if per_task:
        mask = np.stack([_kthvalue_mask(np.abs(b), b.size - round(b.size * keep)) for b in blocks])
    else:
        n_all = blocks.size
        mask = _kthvalue_mask(np.abs(blocks), n_all - round(n_all * keep))
    x = s_t[:, :, None] * blocks * mask
    x = _elect_majority(x)
    x = x * lam[:, None, None]
    return u @ _disjoint_mean(x)


def drm_v(deltas, **kw):
    """DRM-V written out directly from SPEC (not via the transpose identity)."""
    d = np.asarray(deltas, np.float64)
    k, n, m = d.shape
    drop_rate = kw.get("drop_rate", 0.8)
    lam = np.ones(k) if kw.get("coefficients") is None else np.asarray(kw["coefficients"], np.float64)
    rank_rtol = kw.get("rank_rtol", 0.01)
    big = np.concatenate(list(d), axis=0)  # (K n, m)
    u, s, vh = np.linalg.svd(big, full_matrices=False)
    r = int(np.sum(s > rank_rtol * s.max())) if s.size and s.max() > 0 else 0
    u, s, vh = u[:, :r], s[:r], vh[:r]
    blocks = np.stack([u[t * n:(t + 1) * n, :] for t in range(k)])  # (K, n, r)
    if kw.get("renormalize", True):
        c = np.linalg.norm(blocks, axis=1)  # (K, r): column norms over n
        safe = np.where(c > 0, c, 1.0)
        blocks = np.where(c[:, None, :] > 0, blocks / safe[:, None, :], 0.0)
        s_t = s[None, :] * c
    else:
        s_t = np.broadcast_to(s[None, :], (k, r))
    n_all = blocks.size
    mask = _kthvalue_mask(np.abs(blocks), n_all - round(n_all * (1.0 - drop_rate)))
    x = blocks * mask * s_t[:, None, :]
    x = _elect_majority(x)
    x = x * lam[:, None, None]
    return _disjoint_mean(x) @ vh


def ties_like(deltas, coefficients=None):
    """SPEC's path for non-linear leaves (no trim): elect, lambda, disjoint mean."""
    d = np.asarray(deltas, np.float64)
    lam = np.ones(d.shape[0]) if coefficients is None else np.asarray(coefficients, np.float64)
    x = _elect_majority(d) * lam.reshape((-1,) + (1,) * (d.ndim - 1))
    return _disjoint_mean(x)


def ties_mergekit(deltas, density, weights=None, normalize=True, lam=1.0):
    """mergekit's `ties` on one tensor: magnitude top-k per task, weighted sign consensus by sum."""
    d = np.asarray(deltas, np.float64)
    k = d.shape[0]
    w = np.ones(k) if weights is None else np.asarray(weights, np.float64)
    trimmed = []
    for t in range(k):
        flat = d[t].ravel()
        if density >= 1:
            trimmed.append(d[t])
            continue
        keep_n = int(density * flat.size)
        order = np.argsort(-np.abs(flat), kind="stable")[:keep_n]
        mask = np.zeros(flat.size, bool)
        mask[order] = True
        trimmed.append((flat * mask).reshape(d[t].shape))
    wd = np.stack(trimmed) * w.reshape((-1,) + (1,) * (d.ndim - 1))
    majority = np.where(wd.sum(axis=0) >= 0, 1.0, -1.0)
    mask = np.sign(wd) == majority[None]
    mixed = (wd * mask).sum(axis=0)
    if normalize:
        divisor = (w.reshape((-1,) + (1,) * (d.ndim - 1)) * mask).sum(axis=0)
        divisor[divisor == 0] = 1.0
        mixed = mixed / divisor
    return mixed * lam


def ties_paper(task_vectors, density, lam=1.0):
    """TIES paper reference on whole flattened task vectors (K, d): kthvalue trim, majority, mean."""
    tv = np.asarray(task_vectors, np.float64)
    d = tv.shape[1]
    k = d - int(d * density)
    masks = [(_kthvalue_mask(np.abs(row), k)) for row in tv]
    x = tv * np.stack(masks)
    return lam * _disjoint_mean(_elect_majority(x))


def task_arithmetic(deltas, weights=None, lam=1.0):
    d = np.asarray(deltas, np.float64)
    w = np.ones(d.shape[0]) if weights is None else np.asarray(weights, np.float64)
    return lam * np.tensordot(w, d, axes=1)


def linear(deltas, weights=None):
    d = np.asarray(deltas, np.float64)
    w = np.ones(d.shape[0]) if weights is None else np.asarray(weights, np.float64)
    return np.tensordot(w, d, axes=1) / w.sum()


def relative_error(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (denom if denom > 0 else 1.0))
