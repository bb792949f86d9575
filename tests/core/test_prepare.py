"""The second merge core: prepare once and merge many, traced hyperparameters, gradients, vmapped layers,
and one registry that the API, the config checker and the command line all read."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import drm_jax
import merge_reference as ref
from compile_count import counting_compiles
from drm_jax.config.schema import METHOD_PARAMS, ROLE_PARAMS, parse_config
from drm_jax.cli.main import main
from drm_jax.engine.compiled import Layout, merge_layers_jit, prepare_group
from drm_jax.engine.prepare import rules_for
from drm_jax.errors import ConfigError, MergeInputError
from drm_jax.methods.registry import METHODS, get_method, static_values

METHOD_NAMES = sorted(METHODS)
# regmean_plusplus is listed, but it merges blocks in order (drm_jax.regmean_plusplus), not by name
MERGED_BY_NAME = [n for n in METHOD_NAMES if n != "regmean_plusplus"]


def leaf_data_of(method, k):
    """The per-leaf data a method requires (`MethodSpec.leaf_data`), empty: regmean's identity Grams."""
    return {d.name: [{}] * k for d in get_method(method).leaf_data}


def fitted(method, models):
    """As many of the models as the method merges (slerp, nearswap, passthrough: one; nuslerp: two)."""
    most = get_method(method).max_models
    return models[:most] if most else models


def weights_of(method, values):
    """{"coefficients": values} for the methods with per-model weights (slerp, model_stock, ... have none)."""
    return {"coefficients": values} if "coefficients" in get_method(method).names else {}


def layered_trees(seed=0, layers=3, k=3, shape=(8, 6)):
    rng = np.random.default_rng(seed)
    base = {f"layers.{i}.w": rng.standard_normal(shape).astype(np.float32) for i in range(layers)}
    base.update({f"layers.{i}.norm": rng.standard_normal(shape[0]).astype(np.float32) for i in range(layers)})
    models = [{n: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()}
              for _ in range(k)]
    return base, models


@pytest.mark.parametrize("method", ["drm", "ties", "dare_ties", "task_arithmetic"])
def test_a_hyperparameter_grid_compiles_what_one_merge_compiles(method):
    base, models = layered_trees(1)
    grid = {"drm": [{"drop_rate": p, "lambda_": lam, "rank_rtol": r} for p in (0.5, 0.8, 0.93)
                    for lam in (0.5, 1.5) for r in (0.01, 0.2)],
            "ties": [{"density": d, "lambda_": lam} for d in (0.1, 0.35, 0.7) for lam in (0.5, 1.5)],
            "dare_ties": [{"drop_rate": p, "lambda_": lam} for p in (0.1, 0.5, 0.9) for lam in (0.5, 2.0)],
            "task_arithmetic": [{"lambda_": lam, "coefficients": [lam, 1.0, 0.5]} for lam in (0.3, 0.6, 1.2)]}
    jax.clear_caches()
    with counting_compiles() as first:
        prepared = drm_jax.prepare(base, models, method=method)
        prepared.merge(**grid[method][0])
    assert first[0] > 0
    with counting_compiles() as rest:
        for values in grid[method][1:]:
            prepared.merge(**values)
    assert rest[0] == 0, f"{rest[0]} new compilations over the grid"
    # a second prepare of other models of the same shapes reuses every program too
    with counting_compiles() as again:
        drm_jax.prepare(*layered_trees(2), method=method).merge(**grid[method][-1])
    assert again[0] == 0


@pytest.mark.parametrize("method", MERGED_BY_NAME)
def test_prepare_then_merge_equals_merge(method):
    base, models = layered_trees(3)
    values = {"drm": {"drop_rate": 0.7, "lambda_": 1.3}, "knots_ties": {"drop_rate": 0.6},
              "ties": {"density": 0.4, "lambda_": 0.8}, "task_arithmetic": {"lambda_": 0.4},
              "linear": {}, "dare_linear": {"drop_rate": 0.5}, "dare_ties": {"drop_rate": 0.3},
              "tsv_m": {"alpha": 1.2}, "iso_c": {"alpha": 0.9},
              "iso_cts": {"alpha": 1.1},
              "breadcrumbs": {"density": 0.6, "gamma": 0.05, "lambda_": 0.9}, "breadcrumbs_ties": {"density": 0.5},
              "della": {"density": 0.5, "epsilon": 0.1}, "della_linear": {"density": 0.6},
              "sce": {"select_topk": 0.5}, "ram": {"epsilon": 0.05}, "ramplus_tl": {"epsilon": 0.05, "r": 0.3},
              "slerp": {"t": 0.3}, "multislerp": {"eps": 1e-7}, "karcher": {"max_iter": 4, "tol": 1e-4},
              "nearswap": {"t": 0.1}, "passthrough": {"scale": 0.5},
              }.get(method, {})
    models = fitted(method, models)
    coefficients = weights_of(method, [0.5, 1.0, 1.5][:len(models)])
    data = leaf_data_of(method, len(models))
    prepared = drm_jax.prepare(base, models, method=method, **data)
    merged = drm_jax.merge(base, models, method=method, **coefficients, **values, **data)
    again = prepared.merge(**coefficients, **values)
    for name in base:
        np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(merged[name]))
    # traced values given to prepare are defaults of every merge
    with_defaults = drm_jax.prepare(base, models, method=method, **coefficients, **values, **data).merge()
    for name in base:
        np.testing.assert_array_equal(np.asarray(with_defaults[name]), np.asarray(merged[name]))


def test_prepared_drm_sweep_matches_fresh_merges_and_the_reference():
    base, models = layered_trees(4, layers=2, k=3, shape=(10, 7))
    prepared = drm_jax.prepare(base, models, method="drm", direction="vertical")
    for p in (0.5, 0.9):
        merged = prepared.merge(drop_rate=p)
        for i in range(2):
            name = f"layers.{i}.w"
            deltas = np.stack([m[name] - base[name] for m in models]).astype(np.float64)
            expected = base[name] + ref.drm_v(deltas, drop_rate=p)
            assert ref.relative_error(merged[name], expected) < 1e-4


def test_static_parameters_belong_to_prepare():
    base, models = layered_trees(5)
    prepared = drm_jax.prepare(base, models, method="drm")
    with pytest.raises(MergeInputError, match=r"\['direction'\].*structure: give them to drm_jax.prepare"):
        prepared.merge(direction="vertical")
    with pytest.raises(MergeInputError, match="unknown parameter 'densty'"):
        prepared.merge(densty=0.3)


def _loss(prepared, weights):
    def loss(c):
        merged = prepared.merge(coefficients=c)
        return sum(jnp.sum(merged[n] * w) for n, w in weights.items())

    return loss


# the methods with per-model weights (mergekit's slerp, karcher, ... have none: no coefficient to differentiate)
@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if weights_of(m, True)])
def test_gradients_in_the_coefficients_are_finite(method):
    base, models = layered_trees(6)
    models = fitted(method, models)
    k = len(models)
    prepared = drm_jax.prepare(base, models, method=method)
    rng = np.random.default_rng(0)
    weights = {n: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for n, v in base.items()}
    grad = jax.grad(_loss(prepared, weights))(jnp.array([0.7, 1.0, 1.2][:k]))
    assert grad.shape == (k,) and bool(jnp.all(jnp.isfinite(grad)))
    per_layer = jnp.full((k, len(prepared.layer_names)), 0.9)
    grad = jax.grad(_loss(prepared, weights))(per_layer)
    assert grad.shape == per_layer.shape and bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "drm", "tsv_m", "iso_c", "iso_cts"])
def test_gradients_equal_central_finite_differences(method):
    # drm: coefficients apply after pruning and election, so the masks do not move with them and the
    # merge is linear in the coefficients (the derivative at fixed masks is the derivative); the subspace
    # methods are smooth on these deltas (distinct singular values: their SVDs are differentiable)
    with jax.enable_x64(True):
        base, models = layered_trees(7)
        base = {n: v.astype(np.float64) for n, v in base.items()}
        models = [{n: v.astype(np.float64) for n, v in m.items()} for m in models]
        prepared = drm_jax.prepare(base, models, method=method)
        rng = np.random.default_rng(1)
        weights = {n: jnp.asarray(rng.standard_normal(v.shape)) for n, v in base.items()}
        loss = _loss(prepared, weights)
        c = jnp.array([0.6, 1.1, 0.9], jnp.float64)
        grad = np.asarray(jax.grad(loss)(c))
        eps = 1e-4
        fd = np.array([(loss(c.at[t].add(eps)) - loss(c.at[t].add(-eps))) / (2 * eps) for t in range(3)])
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_subspace_gradients_are_finite_at_repeated_singular_values(method):
    """Orthogonal task deltas (every singular value equal) and low-rank ones (repeated zeros) make
    jnp.linalg.svd's derivative NaN; the merges' own derivatives stay finite (docs/methods.md#polar-gradient)."""
    rng = np.random.default_rng(13)
    base = {"w": rng.standard_normal((8, 8)).astype(np.float32),
            "lora": rng.standard_normal((8, 6)).astype(np.float32)}
    models = []
    for t in range(3):
        q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
        low = rng.standard_normal((8, 2)) @ rng.standard_normal((2, 6))  # rank 2: four zero singular values
        models.append({"w": base["w"] + 0.1 * q.astype(np.float32), "lora": base["lora"] + 0.1 * low.astype(np.float32)})
    prepared = drm_jax.prepare(base, models, method=method)
    weights = {n: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for n, v in base.items()}
    grad = jax.grad(_loss(prepared, weights))(jnp.array([0.7, 1.0, 1.2]))
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(grad))) > 0


def test_merge_inside_the_callers_jit_and_vmap():
    base, models = layered_trees(8)
    prepared = drm_jax.prepare(base, models, method="drm")
    eager = prepared.merge(lambda_=0.5, drop_rate=0.75)
    jitted = jax.jit(lambda lam, p: prepared.merge(lambda_=lam, drop_rate=p))(0.5, 0.75)
    for n in base:
        assert ref.relative_error(jitted[n], eager[n]) < 1e-6
    # one vmapped call over a batch of lambdas
    batch = jax.vmap(lambda lam: prepared.merge(lambda_=lam))(jnp.array([0.5, 1.0, 2.0]))
    for j, lam in enumerate((0.5, 1.0, 2.0)):
        single = prepared.merge(lambda_=lam)
        for n in base:
            assert ref.relative_error(batch[n][j], single[n]) < 1e-6


def _drm_chunk(layers):
    rng = np.random.default_rng(9)
    shape, k = (12, 5), 3
    base = tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(layers))
    models = tuple(tuple(b + rng.standard_normal(shape).astype(np.float32) for _ in range(k)) for b in base)
    spec = get_method("drm")
    rule = rules_for(spec, static_values(spec, {"precision": "float32"})).linear
    layout = Layout((False,) * layers, ("float32",) * layers)
    return rule, layout, base, models, spec, k, shape


@pytest.mark.parametrize("layers", [3, 5])
def test_the_drm_programs_are_batched_over_layers_with_no_loop(layers):
    rule, layout, base, models, spec, k, shape = _drm_chunk(layers)
    prepare_jaxpr = jax.make_jaxpr(functools.partial(prepare_group, rule, layout))(base, models)
    text = str(prepare_jaxpr)
    assert "scan" not in text and "while" not in text  # no loop of any kind in the decomposition
    # the decomposition is one batched call: its operand carries the layer axis
    eigh = [e for e in _all_eqns(prepare_jaxpr.jaxpr) if e.primitive.name in ("eigh", "svd")]
    assert eigh and all(e.invars[0].aval.shape[0] == layers for e in eigh)
    b, prepared, _ = prepare_group(rule, layout, base, models)
    hparams = spec.layer_hparams({"drop_rate": 0.8, "rank_rtol": 0.01, "lambda_": 1.0}, "matrix", shape, k,
                                 static_values(spec, {}))
    args = (prepared, b, jnp.ones((layers, k)), jnp.zeros((layers, 2), jnp.uint32), None, hparams)
    merge_jaxpr = jax.make_jaxpr(functools.partial(merge_layers_jit, rule, layout))(*args)
    eqns = list(_all_eqns(merge_jaxpr.jaxpr))
    assert not [e for e in eqns if e.primitive.name == "while"]
    # the only loops are the pruning bisections (31 halvings of the float bits), each batched over layers
    loops = [e for e in eqns if e.primitive.name == "scan"]
    assert loops
    for loop in loops:
        assert loop.params["length"] == 31 != layers
        assert any(v.aval.shape and v.aval.shape[0] == layers for v in loop.invars)


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            inner = getattr(p, "jaxpr", p)
            if hasattr(inner, "eqns"):
                yield from _all_eqns(inner)


def test_layout_of_the_compiled_merge_does_not_grow_with_layers():
    # the lowered HLO of 3 and of 5 layers has the same number of loops: none is over layers
    counts = []
    for layers in (3, 5):
        rule, layout, base, models, spec, k, shape = _drm_chunk(layers)
        b, prepared, _ = prepare_group(rule, layout, base, models)
        hparams = spec.layer_hparams({"drop_rate": 0.8, "rank_rtol": 0.01, "lambda_": 1.0}, "matrix", shape, k,
                                     static_values(spec, {}))
        hlo = merge_layers_jit.lower(rule, layout, prepared, b, jnp.ones((layers, k)),
                                     jnp.zeros((layers, 2), jnp.uint32), None, hparams).as_text()
        counts.append(len(re.findall(r"stablehlo\.while", hlo)))
    assert counts[0] == counts[1] > 0


# -- one registry ----------------------------------------------------------------------------------------
def _valid_value(p):
    if p.kind == "choice":
        return p.choices[-1]
    if p.kind == "bool":
        return not p.default if isinstance(p.default, bool) else True
    if p.kind in ("seed", "count"):
        return 3
    return 0.5


@pytest.mark.parametrize("method", MERGED_BY_NAME)
def test_the_api_accepts_exactly_the_registry_names(method):
    base, models = layered_trees(10, layers=1, k=2)
    models = fitted(method, models)
    spec = get_method(method)
    data = leaf_data_of(method, len(models))
    for p in spec.params:
        for name in (p.name,) + p.aliases:
            value = [0.5, 1.0][:len(models)] if p.per_model and p.kind in ("float", "fraction") else _valid_value(p)
            if name == "trim_scope":
                value = "model"
            drm_jax.merge(base, models, method=method, **{name: value}, **data)
    with pytest.raises(MergeInputError, match=f"unknown parameter 'not_a_parameter' for method '{method}'"):
        drm_jax.merge(base, models, method=method, not_a_parameter=1, **data)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_the_config_checker_and_the_cli_accept_exactly_the_registry_names(method, capsys):
    spec = get_method(method)
    assert METHOD_PARAMS[method] == frozenset(spec.names) | frozenset(ROLE_PARAMS)
    raw = {"merge_method": method, "base_model": "base", "models": ["a", "b"]}
    for p in spec.params:
        for name in (p.name,) + p.aliases:
            if name in ("coefficients", "weight") or (p.per_model and name != "density"):
                continue
            parse_config({**raw, "parameters": {name: _valid_value(p)}})
    with pytest.raises(ConfigError, match="parameters.not_a_parameter: unknown parameter"):
        parse_config({**raw, "parameters": {"not_a_parameter": 1}})
    assert main(["methods", method]) == 0
    listing = capsys.readouterr().out
    for p in spec.params:
        assert re.search(rf"^\s+{re.escape(p.name)}\b", listing, re.M), p.name
        assert all(a in listing for a in p.aliases)


def test_drm_jax_methods_lists_every_method_and_refuses_an_unknown_one(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, spec in METHODS.items():
        assert f"{name}: {spec.summary}" in out
        assert spec.paper.split(",")[-1].strip() in out
    assert main(["methods", "nope"]) == 2
    assert "unknown merge method 'nope'" in capsys.readouterr().err


def test_a_lambda_sweep_after_a_drop_rate_reuses_the_unscaled_delta():
    base, models = layered_trees(11)
    prepared = drm_jax.prepare(base, models, method="drm")
    first = prepared.merge(drop_rate=0.6, lambda_=1.0)
    for lam in (0.5, 2.0):
        scaled = prepared.merge(drop_rate=0.6, lambda_=lam)
        fresh = drm_jax.merge(base, models, method="drm", drop_rate=0.6, lambda_=lam)
        for n in base:
            np.testing.assert_array_equal(np.asarray(scaled[n]), np.asarray(fresh[n]))
            delta = np.asarray(first[n], np.float64) - base[n]
            assert ref.relative_error(np.asarray(scaled[n], np.float64) - base[n], lam * delta) < 1e-5
    # another drop rate (or coefficients) is merged anew, not scaled from the kept delta
    other = prepared.merge(drop_rate=0.9, lambda_=2.0)
    fresh = drm_jax.merge(base, models, method="drm", drop_rate=0.9, lambda_=2.0)
    for n in base:
        np.testing.assert_array_equal(np.asarray(other[n]), np.asarray(fresh[n]))
    again = prepared.merge(drop_rate=0.9, lambda_=2.0, coefficients=[1.0, 0.0, 0.0])
    assert not np.allclose(np.asarray(again["layers.0.w"]), np.asarray(other["layers.0.w"]))


@pytest.mark.parametrize("method, per_layer", [("tsv_m", "tsv_merge"), ("iso_c", "iso_c"), ("iso_cts", "iso_cts")])
def test_subspace_methods_merge_linear_weights_by_their_layer_function(method, per_layer):
    from drm_jax.math import subspace

    base, models = layered_trees(12, layers=2)
    coefficients = [0.5, 1.0, 2.0]
    merged = drm_jax.merge(base, models, method=method, alpha=1.5, coefficients=coefficients)
    c = np.asarray(coefficients, np.float32)[:, None, None]
    for i in range(2):
        w = f"layers.{i}.w"
        deltas = np.stack([m[w] - base[w] for m in models]) * c
        expected = base[w] + np.asarray(getattr(subspace, per_layer)(jnp.asarray(deltas), 1.5))
        assert ref.relative_error(merged[w], expected) < 1e-5
        n = f"layers.{i}.norm"  # other leaves: 1.5 times the mean of the scaled task deltas
        other = base[n] + 1.5 * np.mean(np.stack([m[n] - base[n] for m in models]) * c[:, :, 0], axis=0)
        assert ref.relative_error(merged[n], other) < 1e-5
