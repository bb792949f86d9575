"""DRM's rank cut (keep S_j > rank_rtol * max S) on joint spectra built to straddle it.

Random deltas have no singular value near 1% of the largest, so a cut moved to 0.1% or 2% changes
nothing on them. Here the joint matrix M ([D_1 ... D_K] for DRM-H, [D_1; ...; D_K] for DRM-V) is built
as U diag(s) Vh with one singular value just above the cut and one just below, and nothing is pruned
(drop_rate 0), so each triplet's presence shows in the merged delta.
"""

import numpy as np
import pytest

import drm_jax
import merge_reference as ref

TOL = 1e-4
K, N, M = 3, 10, 6


def straddling_deltas(direction, rtol, seed):
    """(K, N, M) deltas whose joint matrix has singular values (1, 0.6, 0.3, 1.3 rtol, 0.7 rtol)."""
    rng = np.random.default_rng(seed)
    s = np.array([1.0, 0.6, 0.3, 1.3 * rtol, 0.7 * rtol])
    rows, cols = (N, K * M) if direction == "horizontal" else (K * N, M)
    u = np.linalg.qr(rng.standard_normal((rows, s.size)))[0]
    vh = np.linalg.qr(rng.standard_normal((cols, s.size)))[0].T
    joint = (u * s) @ vh
    parts = np.split(joint, K, axis=1 if direction == "horizontal" else 0)
    return np.stack(parts).astype(np.float32)


def reference(direction, deltas, rtol):
    fn = ref.drm_h if direction == "horizontal" else ref.drm_v
    return fn(deltas.astype(np.float64), drop_rate=0.0, rank_rtol=rtol)


@pytest.mark.parametrize("direction", ["horizontal", "vertical"])
@pytest.mark.parametrize("rtol", [None, 0.05])  # None: the default cut, 1%
@pytest.mark.parametrize("seed", [0, 1])
def test_rank_cut_keeps_the_triplet_above_and_drops_the_one_below(direction, rtol, seed):
    cut = 0.01 if rtol is None else rtol
    deltas = straddling_deltas(direction, cut, seed)
    kwargs = {} if rtol is None else {"rank_rtol": rtol}
    got = np.asarray(drm_jax.merge({"w": np.zeros((N, M), np.float32)}, [{"w": d} for d in deltas],
                                   method="drm", direction=direction, drop_rate=0.0, **kwargs)["w"], np.float64)
    assert ref.relative_error(got, reference(direction, deltas, cut)) < TOL
    # the case is decisive: a cut below 0.7 rtol keeps one triplet more, one above 1.3 rtol one fewer
    for moved in (0.1 * cut, 2.0 * cut):
        assert ref.relative_error(got, reference(direction, deltas, moved)) > 10 * TOL, moved
