"""Merging LoRA adapters into one adapter with every registered method (issue 23, class 3): the adapter
either equals the model merge of the same recipe minus the base, or the method is refused by name, from
its declared facts (`MethodSpec.reads_base`, `Rules.shift_equivariant`), never merged over a zero base."""

from __future__ import annotations

import json

import numpy as np
import pytest

import drm_jax
from drm_jax import LoraWeight
from drm_jax.errors import AdapterMethodError, DrmJaxError, MergeInputError
from drm_jax.methods.registry import METHODS

from .conftest import refused

# every leaf's rank-r update summed over K <= 2 adapters has rank <= 4 = the smaller side: no rank cut.
# One shape: one compiled program per method (the suite stays fast).
SHAPES = {"layers.0.q.weight": (4, 6), "layers.1.q.weight": (4, 6)}
UNADAPTED = {"layers.2.q.weight": (4, 6)}
PARAMS = {"ties": {"density": 0.5}, "dare_ties": {"density": 0.6}, "breadcrumbs": {"density": 0.7},
          "nearswap": {"t": 0.5}}


def _case(k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in {**SHAPES, **UNADAPTED}.items()}
    r = 4 // k
    adapters = [{n: LoraWeight((0.2 * rng.standard_normal((o, r))).astype(np.float32),
                               rng.standard_normal((r, i)).astype(np.float32), 1.5) for n, (o, i) in SHAPES.items()}
                for _ in range(k)]
    return base, adapters


def _models(base, adapters):
    return [{n: (base[n] + w.scale * np.asarray(w.b) @ np.asarray(w.a)).astype(np.float32) if n in a else base[n]
             for n, w in [(n, a.get(n)) for n in base]} for a in adapters]


def _kwargs(spec, k):
    kwargs = dict(PARAMS.get(spec.name, {}))
    if "coefficients" in spec.names:
        kwargs["coefficients"] = [0.7, 0.4][:k]
    return kwargs


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_merges_adapters_exactly_or_refuses_by_name(name):
    spec = METHODS[name]
    k = 1 if spec.max_models == 1 else 2
    base, adapters = _case(k)
    kwargs = _kwargs(spec, k)
    if spec.reads_base or spec.leaf_data:
        with pytest.raises(AdapterMethodError, match=f"method '{name}'"):
            drm_jax.merge_adapters(base, adapters, method=name, exclude=(), **kwargs)
        return
    if name == "regmean_plusplus":  # a function over blocks, not a per-layer merge: refused by name
        with pytest.raises(MergeInputError, match=f"method '{name}'.*drm_jax.regmean_plusplus"):
            drm_jax.merge_adapters(base, adapters, method=name, exclude=(), **kwargs)
        return
    result = drm_jax.merge_adapters(base, adapters, method=name, exclude=(), **kwargs)
    want = drm_jax.merge(base, _models(base, adapters), method=name, exclude=(), **kwargs)
    for n in SHAPES:
        w = result.adapter[n]
        got = np.asarray(w.b, np.float64) @ np.asarray(w.a, np.float64)
        expected = np.asarray(want[n], np.float64) - base[n]
        # float32 rounding of the model merge's base + delta, and the update's own
        tolerance = 1e-4 * float(np.abs(expected).max()) + 1e-6 * float(np.abs(base[n]).max())
        assert float(np.abs(got - expected).max()) <= tolerance, (name, n)
    for n in UNADAPTED:  # the model merge leaves them at the base: no adapter entry changes them
        assert n not in result.adapter
        np.testing.assert_allclose(want[n], base[n], atol=1e-6)


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_whole_model_trim_counts_the_weights_no_adapter_changes(density):
    base, adapters = _case(2, seed=5)
    base.update({"norm.weight": np.ones(6, np.float32), "position_ids": np.arange(3)})
    kwargs = dict(density=density, trim_scope="model", coefficients=[0.7, 0.4], exclude=())
    result = drm_jax.merge_adapters(base, adapters, method="ties", **kwargs)
    want = drm_jax.merge(base, _models(base, adapters), method="ties", **kwargs)
    for n in SHAPES:
        got = np.asarray(result.adapter[n].b, np.float64) @ np.asarray(result.adapter[n].a, np.float64)
        np.testing.assert_allclose(got, np.asarray(want[n], np.float64) - base[n], atol=2e-6)


def test_the_methods_that_read_the_base_are_the_weight_space_ones():
    """The declared fact, against the rules themselves: a method that does not declare reads_base merges
    to the same result whatever base weights it is handed (so an adapter over any base is exact)."""
    assert {n for n, s in METHODS.items() if s.reads_base} == {"slerp", "karcher", "arcee_fusion", "passthrough"}
    base, adapters = _case(1, seed=3)
    shifted = {n: v + 5.0 for n, v in base.items()}
    for name in ("nearswap", "task_arithmetic", "slerp"):
        spec = METHODS[name]
        deltas = [{n: m[n] - base[n] for n in base} for m in _models(base, adapters)]
        merged = [drm_jax.merge(b, [{n: b[n] + d[n] for n in b} for d in deltas], method=name, exclude=())
                  for b in (base, shifted)]
        moves = max(float(np.abs((merged[0][n] - base[n]) - (merged[1][n] - shifted[n])).max()) for n in SHAPES)
        assert (moves > 1e-3) == spec.reads_base, (name, moves)


def test_api_refusal_is_a_drm_jax_error_naming_the_method():
    base, adapters = _case(1)
    for name, kwargs in (("slerp", {"t": 0.3}), ("passthrough", {}), ("karcher", {})):
        with pytest.raises(DrmJaxError, match=f"'{name}'.*base model's weights"):
            drm_jax.merge_adapters(base, adapters, method=name, **kwargs)


# -- the command line -------------------------------------------------------------------------------------
@pytest.fixture
def adapter_family(family, tmp_path):
    """Two PEFT adapters (q_proj, v_proj of layer 0, rank 2) over the tiny family's base."""
    from drm_jax.io.peft_io import write_lora_adapter

    rng = np.random.default_rng(1)
    paths = []
    for t in range(2):
        weights = {f"model.layers.0.self_attn.{m}.weight": (0.1 * rng.standard_normal((16, 2)).astype(np.float32),
                                                             rng.standard_normal((2, 16)).astype(np.float32), False)
                   for m in ("q_proj", "v_proj")}
        paths.append(write_lora_adapter(tmp_path / f"adapter{t}", weights))
    return family / "base", paths


def _config(path, method, base, adapters, params="", weights=True):
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for a, w in zip(adapters, (0.6, 0.4)):
        lines.append(f"  - model: {a}" + (f"\n    parameters: {{weight: {w}}}" if weights else ""))
    lines += [params, "dtype: float32"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("method, count, params, weights", [
    ("slerp", 1, "parameters: {t: 0.5}", False),
    ("arcee_fusion", 1, "", False),
    ("karcher", 2, "", False),
    ("linear", 2, "parameters: {normalize: false, weight: 0.5}", True),
])
def test_adapter_out_refuses_methods_that_are_not_base_plus_a_merge_of_updates(adapter_family, tmp_path, capfd,
                                                                              method, count, params, weights):
    base, adapters = adapter_family
    config = _config(tmp_path / "merge.yaml", method, base, adapters[:count], params, weights)
    out = tmp_path / "out"
    line = refused(capfd, ["merge", config, out, "--adapter-out"], out, [config, base.parent, *adapters],
                   ["--adapter-out", f"method '{method}'", str(config)])
    assert "merge the adapted models instead" in line


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", "parameters: {lambda: 0.8}"),
    ("linear", "parameters: {weight: 0.5}"),  # the base is averaged in: an adapter that changes nothing
    # the paper's trim over the whole task vector: the weights no adapter changes count as zeros
    ("ties", "parameters: {density: 0.5, trim_scope: model}"),
])
def test_adapter_out_agrees_with_the_model_merge_of_the_same_config(adapter_family, tmp_path, capfd, method, params):
    from drm_jax.cli.main import main
    from safetensors.numpy import load_file

    base, adapters = adapter_family
    config = _config(tmp_path / "merge.yaml", method, base, adapters, params)
    # rank 16: TIES' merged update is of full rank (at the default K r it is truncated, and says so)
    assert main(["merge", str(config), str(tmp_path / "adapter"), "--adapter-out", "--adapter-rank", "16",
                 "--quiet"]) == 0
    assert main(["merge", str(config), str(tmp_path / "model"), "--quiet"]) == 0
    factors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    merged = load_file(str(tmp_path / "model" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    for m in ("q_proj", "v_proj"):
        prefix = f"base_model.model.model.layers.0.self_attn.{m}"
        update = settings["lora_alpha"] / settings["r"] * factors[f"{prefix}.lora_B.weight"] @ \
            factors[f"{prefix}.lora_A.weight"]
        name = f"model.layers.0.self_attn.{m}.weight"
        np.testing.assert_allclose(original[name] + update, merged[name], atol=2e-5)
