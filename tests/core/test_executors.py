"""The executors' scheduling rule on CPU: one decomposition program in flight (drm_jax.engine.executors)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import drm_jax
from drm_jax.engine import executors
from drm_jax.engine.merge import merge_leaves


def watch_decompositions(monkeypatch):
    """Spy on every program that runs a rule's `prepare`: fails when one is dispatched before the executor
    waited for the previous one (`wait_for_decomposition`, after which its outputs are computed), whether or
    not that one happens to be finished: the rule is a schedule, not a race. Returns the dispatched outputs."""
    dispatched, outstanding = [], []
    real_prepare, real_wait = executors.prepare_group, executors.wait_for_decomposition

    def prepare_spy(rule, *args, **kwargs):
        assert not outstanding, "a decomposition program was dispatched before the previous one was waited for"
        out = real_prepare(rule, *args, **kwargs)
        if rule.prepare is not None:
            dispatched.append(out)
            outstanding.append(out)
        return out

    def wait_spy(out):
        real_wait(out)
        assert all(x.is_ready() for x in jax.tree.leaves(out))
        outstanding[:] = [o for o in outstanding if o is not out]
        return out

    monkeypatch.setattr(executors, "prepare_group", prepare_spy)
    monkeypatch.setattr(executors, "wait_for_decomposition", wait_spy)
    return dispatched


def leaves(layers=4, shape=(6, 5), k=2):
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(shape).astype(np.float32) for _ in range(layers)]
    base += [rng.standard_normal((5, 4)).astype(np.float32) for _ in range(layers)]  # a second group
    models = [[x + 0.1 * rng.standard_normal(x.shape).astype(np.float32) for x in base] for _ in range(k)]
    return base, models


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rule is CPU's (LAPACK's thread pool)")
def test_streamed_decompositions_run_one_at_a_time_without_check_finite(monkeypatch):
    # check_finite=False: no host read of a chunk's flags serializes the chunks; the rule alone must
    dispatched = watch_decompositions(monkeypatch)
    base, models = leaves()
    names = [f"layers.{i}.w" for i in range(len(base))]
    out = {}
    merge_leaves(names, [x.shape for x in base], [x.dtype for x in base], get_base=lambda i: base[i],
                 get_model=lambda t, i: models[t][i], put=out.__setitem__, num_models=len(models), method="drm",
                 max_group_bytes=2 * 3 * 6 * 5 * 4, check_finite=False)
    assert len(dispatched) >= 4 and sorted(out) == list(range(len(base)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rule is CPU's (LAPACK's thread pool)")
def test_prepared_decompositions_run_one_at_a_time(monkeypatch):
    dispatched = watch_decompositions(monkeypatch)
    base, models = leaves()
    tree = {f"layers.{i}.w": x for i, x in enumerate(base)}
    trees = [{f"layers.{i}.w": x for i, x in enumerate(m)} for m in models]
    prepared = drm_jax.prepare(tree, trees, method="drm", max_group_bytes=2 * 3 * 6 * 5 * 4)
    prepared.merge(drop_rate=0.3)
    assert len(dispatched) >= 4



def test_streamed_whole_model_thresholds_equal_the_in_memory_merge():
    """merge_leaves (nothing stored) takes TIES' model-scope thresholds from the streamed statistics passes
    (`endpoints.streamed_thresholds`); they equal the in-memory thresholds, so the merges agree exactly."""
    rng = np.random.default_rng(0)
    names, shapes = ["l0.w", "l1.w", "b"], [(8, 6), (8, 6), (6,)]
    base = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    models = [[b + 0.1 * rng.standard_normal(b.shape).astype(np.float32) for b in base] for _ in range(3)]
    out = {}
    merge_leaves(names, shapes, [np.float32] * 3, get_base=lambda i: base[i], get_model=lambda t, i: models[t][i],
                 put=lambda i, a: out.__setitem__(i, np.asarray(a)), num_models=3, method="ties", density=0.3,
                 trim_scope="model")
    want = drm_jax.merge(dict(zip(names, base)), [dict(zip(names, m)) for m in models], method="ties", density=0.3,
                         trim_scope="model")
    for i, name in enumerate(names):
        np.testing.assert_array_equal(out[i], np.asarray(want[name]), err_msg=name)


@pytest.mark.parametrize("method, numbers", [
    ("drm", {"drop_rate": 0.5, "coefficients": [0.7, 0.4]}),  # prepares (decompositions), vmapped executor
    ("linear", {"coefficients": [0.7, 0.3]}),  # prepares nothing, fused executor
])
def test_streamed_merge_equals_the_in_memory_merge(method, numbers):
    """merge_leaves (each chunk read, prepared, merged, handed over, dropped) puts the leaves that
    drm_jax.merge returns (everything prepared first, then merged), per-leaf numbers included, and passes
    the ignored and non-floating leaves through."""
    rng = np.random.default_rng(1)
    names = ["l0.w", "l1.w", "l2.w", "l0.b", "frozen.w", "step"]
    base = [rng.standard_normal((6, 5)).astype(np.float32) for _ in range(3)]
    base += [rng.standard_normal(5).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32),
             np.array([7], np.int32)]
    models = [[x + (0.1 * rng.standard_normal(x.shape)).astype(x.dtype) for x in base] for _ in range(2)]
    keywords = dict(method=method, ignore=("frozen",), max_group_bytes=2 * 3 * 6 * 5 * 4,  # chunks of two
                    leaf_params={"l1.w": {"coefficients": [0.2, 0.9]}}, **numbers)
    out = {}
    counts = merge_leaves(names, [x.shape for x in base], [x.dtype for x in base], get_base=lambda i: base[i],
                          get_model=lambda t, i: models[t][i], put=lambda i, a: out.__setitem__(i, np.asarray(a)),
                          num_models=2, **keywords)
    want = drm_jax.merge(dict(zip(names, base)), [dict(zip(names, m)) for m in models], **keywords)
    assert counts == {"matrix": 3, "other": 1, "ignore": 1, "not_floating": 1}
    assert sorted(out) == list(range(len(names)))
    for i, name in enumerate(names):
        assert out[i].dtype == np.asarray(want[name]).dtype, name
        np.testing.assert_array_equal(out[i], np.asarray(want[name]), err_msg=name)
    assert not np.array_equal(out[1], base[1])  # it did merge
