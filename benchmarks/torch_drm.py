"""DRM the reference implementation's way: PyTorch float32, one dense SVD per matrix, one matrix after another.

The loop every DRM benchmark times drm_jax against (benchmarks/bench_drm.py on CPU, benchmarks/gpu on a GPU):
the steps of docs/methods.md#drm written per matrix with torch.linalg.svd and kthvalue pruning. It runs on
whatever device `deltas` is on.
"""

from __future__ import annotations

import torch


def torch_drm(deltas: torch.Tensor, drop_rate=0.8, vertical=False, rank_rtol=0.01) -> torch.Tensor:
    """DRM on one matrix, the reference implementation's way (PyTorch, float32, dense SVD)."""
    if vertical:
        return torch_drm(deltas.transpose(1, 2), drop_rate, False, rank_rtol).T
    k, n, m = deltas.shape
    big = torch.cat(list(deltas), dim=1)
    u, s, vh = torch.linalg.svd(big, full_matrices=False)
    r = int((s > rank_rtol * s.max()).sum())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    blocks = torch.stack(torch.split(vh, m, dim=1))  # (K, r, m)
    c = blocks.norm(dim=2, keepdim=True)
    blocks = torch.where(c > 0, blocks / c.clamp_min(1e-30), torch.zeros_like(blocks))
    s_t = s[None, :, None] * c
    mags = blocks.abs().flatten()
    n_all = mags.numel()
    kk = n_all - round(n_all * (1 - drop_rate))
    if kk > 0:
        blocks = blocks * (blocks.abs() >= torch.kthvalue(mags, kk).values)
    x = s_t * blocks
    sign = torch.sign(x.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    x = torch.where(torch.sign(x) == sign, x, torch.zeros_like(x))
    merged = x.sum(0) / (x != 0).sum(0).clamp_min(1)
    return u @ merged
