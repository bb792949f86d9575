"""Slabs: the streaming planner merges elementwise methods in 1-D slabs of one size (engine/sources.py).

The results must be those of the per-tensor merge bit for bit, the compiled programs must not depend on
the tensors' shapes, a tensor must be released once merged, and errors must name the real tensor.
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

import drm_jax
from drm_jax.engine import sources as sources_lib
from drm_jax.engine.sources import CheckpointSources, Slab, stream_merge
from drm_jax.errors import MergeInputError


class Reader:
    """A checkpoint reader over a dict of arrays that counts reads."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors, self.reads = tensors, 0

    def keys(self):
        return list(self.tensors)

    def shape(self, name):
        return self.tensors[name].shape

    def dtype(self, name):
        return self.tensors[name].dtype

    def get(self, name):
        self.reads += 1
        return self.tensors[name]


def shapes_of(width: int, inner: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {"embed.weight": (vocab, width)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "norm.weight": (width,), p + "q.weight": (width, width), p + "up.weight": (inner, width),
                       p + "down.weight": (width, inner), p + "scale": ()})
    shapes["head.weight"] = (vocab, width)
    return shapes


def family(shapes, k=3, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    models = [{n: (v.astype(np.float32) + 0.1 * rng.standard_normal(v.shape)).astype(dtype) for n, v in base.items()}
              for _ in range(k)]
    return base, models


def run_stream(base, models, method="task_arithmetic", budget=None, **params):
    readers = [Reader(base)] + [Reader(m) for m in models]
    src = CheckpointSources(readers[0], readers[1:], [f"m{t}" for t in range(len(models))], "base",
                            role_kwargs={}, exact_roles=frozenset({"matrix", "other"}))
    out = {}
    cached = []

    def add(name, array):
        assert name not in out
        out[name] = np.array(array)
        cached.append(sum(not isinstance(v, sources_lib._Tail) for v in src._cache.values()))

    params = {"coefficients": [0.5, 1.0, -0.25][: len(models)], **params}
    stream_merge(src, add, method=method, params=params, layout="torch", max_group_bytes=None, block_bytes=budget)
    return out, src, readers, cached


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"lambda_": 0.7}), ("linear", {})])
@pytest.mark.parametrize("budget", [None, 300_000])
def test_slabs_equal_the_in_memory_merge_bit_for_bit(method, params, budget):
    shapes = shapes_of(48, 80, 3, 300)
    base, models = family(shapes)
    out, src, readers, _ = run_stream(base, models, method, budget, **params)
    assert any(isinstance(p, Slab) for p in src.parts)
    assert any(isinstance(p, Slab) and len(p.segments) > 1 for p in src.parts)  # packed remainders
    want = drm_jax.merge(base, models, method=method, coefficients=[0.5, 1.0, -0.25], **params)
    assert out.keys() == base.keys()
    for name in base:
        assert out[name].dtype == base[name].dtype and out[name].shape == base[name].shape, name
        np.testing.assert_array_equal(out[name], np.asarray(want[name]), err_msg=name)
    assert all(r.reads == len(base) for r in readers), [r.reads for r in readers]  # each tensor read once
    assert not src._cache  # everything released


def test_slab_layout():
    shapes = shapes_of(64, 96, 4, 500)
    base, models = family(shapes)
    readers = [Reader(base)] + [Reader(m) for m in models]
    src = CheckpointSources(readers[0], readers[1:], ["a", "b", "c"], "base", role_kwargs={},
                            exact_roles=frozenset({"matrix", "other"}))
    src.plan_blocks(3, 200_000)
    slabs = [p for p in src.parts if isinstance(p, Slab)]
    assert len(slabs) == len(src.parts)  # every tensor is merged elementwise here
    size = slabs[0].size
    assert size & (size - 1) == 0 and all(p.size == size for p in slabs)
    assert len(slabs) % sources_lib.SLABS_PER_CALL == 0
    covered = {n: np.zeros(int(np.prod(s)), int) for n, s in shapes.items()}
    names = list(shapes)
    for p in slabs:
        assert sum(b - a for _, a, b, _ in p.segments) <= size
        for i, a, b, _ in p.segments:
            covered[names[i]][a:b] += 1
    assert all((c == 1).all() for c in covered.values())  # every element in exactly one slab
    # a whole slab is a view of the array read, not a copy
    j = next(j for j, p in enumerate(src.parts) if p.whole_view)
    i = src.parts[j].segments[0][0]
    assert np.shares_memory(src.get_model(1, j), models[1][names[i]])


def test_programs_do_not_depend_on_the_shapes():
    """A second model with other shapes (same slab size and dtypes) compiles no new program."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.clear_caches()  # the first run compiles, whatever ran before
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        run_stream(*family(shapes_of(32, 64, 2, 200)), budget=150_000)
        before = len(compiles)
        run_stream(*family(shapes_of(40, 72, 3, 190), seed=1), budget=150_000)
        after = len(compiles)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert before > 0
    assert after == before, f"{after - before} new compilations for new shapes"


def test_tensors_are_released_as_they_are_merged():
    shapes = {f"w{i}": (64, 96) for i in range(40)}  # 6144 elements: one whole slab of 4096 + a remainder each
    base, models = family(shapes)
    out, src, _, cached = run_stream(base, models, budget=100_000)
    assert src.parts[0].size == 4096
    # only the tensors of the slabs of about one call are held in full (K + 1 = 4 arrays each), not all 40
    assert max(cached) <= 4 * (sources_lib.SLABS_PER_CALL + 2), cached
    assert not src._cache


def test_mixed_dtypes_get_slabs_of_their_own():
    shapes = shapes_of(32, 48, 2, 100)
    base, models = family(shapes)
    for name in ("layers.0.q.weight", "layers.1.up.weight"):
        base[name] = base[name].astype(ml_dtypes.bfloat16)
        for m in models:
            m[name] = m[name].astype(ml_dtypes.bfloat16)
    out, src, _, _ = run_stream(base, models)
    signatures = {p.dtypes for p in src.parts if isinstance(p, Slab) and p.segments}
    assert len(signatures) == 2
    want = drm_jax.merge(base, models, method="task_arithmetic", coefficients=[0.5, 1.0, -0.25])
    for name in base:
        assert out[name].dtype == base[name].dtype, name
        np.testing.assert_array_equal(out[name], np.asarray(want[name]), err_msg=name)


def test_an_overflow_names_the_tensor_not_the_slab():
    shapes = shapes_of(16, 24, 2, 50)
    base, models = family(shapes)
    name = "layers.1.norm.weight"  # a small tensor: packed with others in one slab
    for m in models:
        m[name] = np.full(shapes[name], 3e38, np.float32)
    with pytest.raises(MergeInputError, match=name.replace(".", r"\.") + ".*Inf"):
        run_stream(base, models, coefficients=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("method, parameters", [("task_arithmetic", {}), ("ties", {"density": 0.5})],
                         ids=["slabs", "per-tensor"])
def test_the_command_line_writes_out_dtype(method, parameters, tmp_path, read_output):
    """`out_dtype` through `drm-jax merge`: float16 checkpoints merged in float32 and written in bfloat16,
    every tensor (slabs for the elementwise task arithmetic, one tensor at a time for TIES) in bfloat16 and
    equal to the in-memory float32 merge rounded once to bfloat16."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from drm_jax.cli.main import main

    shapes = {"model.embed_tokens.weight": (40, 8), "model.layers.0.mlp.up_proj.weight": (12, 8),
              "model.layers.0.input_layernorm.weight": (8,), "model.layers.1.mlp.up_proj.weight": (12, 8)}
    base, models = family(shapes, k=2, seed=3, dtype=np.float16)
    for label, tensors in (("base", base), ("a", models[0]), ("b", models[1])):
        (tmp_path / label).mkdir()
        save_file(tensors, str(tmp_path / label / "model.safetensors"), metadata={"format": "pt"})
    numbers = "".join(f", {k}: {v}" for k, v in parameters.items())
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: {method}\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                      f"  - model: {tmp_path / 'a'}\n    parameters: {{weight: 0.7{numbers}}}\n"
                      f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 0.3{numbers}}}\n"
                      "dtype: float32\nout_dtype: bfloat16\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as f:
        written = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert written == {name: "BF16" for name in shapes}
    as_f32 = [{n: v.astype(np.float32) for n, v in tree.items()} for tree in (base, *models)]
    want = drm_jax.merge(as_f32[0], as_f32[1:], method=method, coefficients=[0.7, 0.3], exclude=[], **parameters)
    got = read_output(tmp_path / "out")
    for name in shapes:
        rounded = np.asarray(want[name]).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(got[name], rounded, err_msg=name)
