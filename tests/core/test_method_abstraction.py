"""One method abstraction: a composition of `drm_jax.math` stages is a method like any registered one, and
every entry point takes exactly the parameters of its method."""


import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import drm_jax
import merge_reference as ref
from compile_count import counting_compiles
from drm_jax import math as m
from drm_jax.engine.merge import merge_leaves
from drm_jax.errors import MergeInputError
from drm_jax.math.select import pruning_counts
from drm_jax.math.sparsify import band_counts, prune_geometry, rank_probabilities, rescale_l1
from drm_jax.math.state import number
from drm_jax.methods.registry import get_method, static_values, traced_values


def trees(seed=0, layers=2, k=3, shape=(6, 5)):
    rng = np.random.default_rng(seed)
    base = {f"blocks.{i}.w": rng.standard_normal(shape).astype(np.float32) for i in range(layers)}
    base["norm"] = rng.standard_normal(shape[1]).astype(np.float32)
    models = [{n: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()}
              for _ in range(k)]
    return base, models


# task arithmetic written as a composition: both numbers (lambda_, coefficients) are the method's traced ones
TASK_ARITHMETIC = drm_jax.MergeMethod(linear=m.chain(m.scale_by_coefficients(), m.sum_tasks(), m.scale()),
                                      other=m.chain(m.scale_by_coefficients(), m.sum_tasks(), m.scale()))
# TIES-like trim with a traced density, then a disjoint mean and a traced lambda
TRIMMED = drm_jax.MergeMethod(
    linear=m.chain(m.prune(None, scope="per_task"), m.elect_sign(), m.scale_by_coefficients(), m.disjoint_mean(),
                   m.scale()),
    other=drm_jax.methods.ties_like())


def assert_trees_close(a, b, tol=1e-6):
    for name in b:
        assert ref.relative_error(a[name], b[name]) <= tol, name


def test_a_composition_takes_the_numbers_its_stages_read():
    spec = drm_jax.methods.method_spec(TRIMMED)
    assert [p.name for p in spec.traced] == ["coefficients", "density", "lambda_"]
    base, models = trees()
    got = drm_jax.merge(base, models, method=TASK_ARITHMETIC, lambda_=0.7, coefficients=[1.0, 0.5, 2.0])
    want = drm_jax.merge(base, models, method="task_arithmetic", lambda_=0.7, coefficients=[1.0, 0.5, 2.0])
    assert_trees_close(got, want)


def test_prepare_of_a_composition_and_a_sweep_compile_nothing_new():
    base, models = trees()
    prepared = drm_jax.prepare(base, models, method=TRIMMED)  # failed before: "must be a registered name"
    first = prepared.merge(density=0.2, lambda_=1.0)
    with counting_compiles() as count:
        swept = [prepared.merge(density=d, lambda_=lam) for d in (0.4, 0.8) for lam in (0.5, 2.0)]
    assert count[0] == 0, f"{count[0]} new compilations over the sweep"
    # the numbers reach the stages: a denser trim changes the merge, lambda scales it
    assert not np.allclose(swept[0]["blocks.0.w"], first["blocks.0.w"])
    np.testing.assert_allclose(swept[1]["blocks.0.w"] - base["blocks.0.w"],
                               4 * (swept[0]["blocks.0.w"] - base["blocks.0.w"]), rtol=1e-5, atol=1e-6)


def test_a_composition_on_a_mesh_equals_one_device():
    base, models = trees(layers=3)
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("layers",))
    single = drm_jax.merge(base, models, method=TRIMMED, density=0.5)
    sharded = drm_jax.merge(base, models, method=TRIMMED, density=0.5, mesh=mesh)
    assert_trees_close(sharded, single, 1e-5)


def test_leaf_params_of_a_composition():
    base, models = trees()
    merged = drm_jax.merge(base, models, method=TASK_ARITHMETIC, leaf_params={"blocks.1.w": {"lambda_": 3.0}})
    plain = drm_jax.merge(base, models, method=TASK_ARITHMETIC)
    tripled = drm_jax.merge(base, models, method=TASK_ARITHMETIC, lambda_=3.0)
    np.testing.assert_allclose(merged["blocks.0.w"], plain["blocks.0.w"], rtol=1e-6)
    np.testing.assert_allclose(merged["blocks.1.w"], tripled["blocks.1.w"], rtol=1e-6)


def test_merge_adapters_takes_a_composition():
    rng = np.random.default_rng(3)
    base = {"w": np.zeros((6, 5), np.float32)}
    adapters = [{"w": drm_jax.LoraWeight(rng.standard_normal((6, 2)).astype(np.float32),
                                         rng.standard_normal((2, 5)).astype(np.float32), 0.5)} for _ in range(2)]
    got = drm_jax.merge_adapters(base, adapters, method=TASK_ARITHMETIC, lambda_=0.5)
    want = drm_jax.merge_adapters(base, adapters, method="task_arithmetic", lambda_=0.5)
    g, w = (np.asarray(x.adapter["w"].b) @ np.asarray(x.adapter["w"].a) for x in (got, want))
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_named_methods_are_method_values_with_bound_parameters():
    # drm_jax.drm, .ties and .linear were the method modules ("'module' object is not callable")
    for name in ("drm", "knots_ties", "ties", "task_arithmetic", "linear", "dare_linear", "dare_ties"):
        assert getattr(drm_jax, name) is get_method(name)
    base, models = trees()
    bound = drm_jax.merge(base, models, method=drm_jax.drm(direction="vertical", drop_rate=0.5))
    named = drm_jax.merge(base, models, method="drm", direction="vertical", drop_rate=0.5)
    assert_trees_close(bound, named, 0)
    assert get_method("dare_linear").param("drop_rate").default == 0.8  # one default, the registry's


def test_density_on_drm_stays_density():
    # density 0.3 keeps N - round(0.3 N) ... exactly: stored as a drop rate and inverted back it became
    # 0.30000000000000004, and at N = 15 (4.5 vs 4.500000000000001) one more entry was pruned
    spec = get_method("drm")
    static = static_values(spec, {})
    k, shape = 3, (5, 5)  # joint space: q = 5 rows of 5 entries, every task ranked together
    values = traced_values(spec, spec.canonical({"density": 0.3}))
    counts = np.asarray(spec.layer_hparams(values, "matrix", shape, k, static).prune_counts)
    rows, row_size = prune_geometry((k, 5, 5), "joint", joint=True)
    assert row_size == 15  # one valid row of the joint space: N = 15
    np.testing.assert_array_equal(counts, np.asarray(pruning_counts(0.3, rows, row_size)))
    assert counts[1] == 15 - round(15 * 0.3) != 15 - round(15 * (1 - (1 - 0.3)))


def test_every_entry_point_refuses_a_parameter_its_method_does_not_take():
    base, models = trees()
    cases = [("linear", {"drop_rate": 0.5}), ("linear", {"seed": 1}), ("ties", {"direction": "vertical"}),
             ("task_arithmetic", {"drop_rate": 0.5}), (TASK_ARITHMETIC, {"density": 0.5})]
    for method, given in cases:
        (name,) = given
        with pytest.raises(MergeInputError, match=f"unknown parameter '{name}'"):
            drm_jax.merge(base, models, method=method, **given)
        with pytest.raises(MergeInputError, match=f"unknown parameter '{name}'"):
            drm_jax.prepare(base, models, method=method, **given)
    with pytest.raises(MergeInputError, match="unknown parameter 'drop_rate'"):
        drm_jax.prepare(base, models, method="linear").merge(drop_rate=0.5)
    with pytest.raises(MergeInputError, match="unknown parameter 'layout'"):  # options belong to prepare
        drm_jax.prepare(base, models, method="linear").merge(layout="flax")
    adapters = [{"w": drm_jax.LoraWeight(np.ones((6, 1), np.float32), np.ones((1, 5), np.float32), 1.0)}] * 2
    with pytest.raises(MergeInputError, match="unknown parameter 'drop_rate'"):
        drm_jax.merge_adapters({"w": np.zeros((6, 5), np.float32)}, adapters, method="task_arithmetic",
                               drop_rate=0.5)
    with pytest.raises(MergeInputError, match="unknown parameter 'direction'"):
        merge_leaves(["w"], [(6, 5)], [np.float32], get_base=lambda i: base["blocks.0.w"],
                     get_model=lambda t, i: models[t]["blocks.0.w"], put=lambda i, x: None, num_models=3,
                     method="linear", direction="vertical")


def test_options_object_equals_keywords():
    base, models = trees()
    options = drm_jax.MergeOptions(layout="flax", exclude=(), max_group_bytes=1000)
    assert_trees_close(drm_jax.merge(base, models, method="ties", options=options),
                       drm_jax.merge(base, models, method="ties", layout="flax", exclude=(), max_group_bytes=1000), 0)


def test_register_makes_a_composition_a_named_method():
    base, models = trees()
    drm_jax.methods.register("my_task_arithmetic", TASK_ARITHMETIC)
    try:
        assert_trees_close(drm_jax.merge(base, models, method="my_task_arithmetic", lambda_=0.5),
                           drm_jax.merge(base, models, method=TASK_ARITHMETIC, lambda_=0.5), 0)
        with pytest.raises(MergeInputError, match="built-in"):
            drm_jax.methods.register("drm", TASK_ARITHMETIC)
    finally:
        drm_jax.methods.unregister("my_task_arithmetic")
    with pytest.raises(MergeInputError, match="unknown merge method"):
        drm_jax.merge(base, models, method="my_task_arithmetic")


def test_the_readme_composition_runs():
    base, models = trees()
    my_drm = drm_jax.MergeMethod(
        linear=m.chain(m.joint_space("vertical"), m.renormalize(), m.prune(0.3, scope="per_task"),
                       m.elect_sign(), m.scale_by_coefficients(), m.disjoint_mean(), m.recompose()),
        other=drm_jax.methods.ties_like())
    merged = drm_jax.merge(base, models, method=my_drm)
    assert drm_jax.methods.method_spec(my_drm).traced == (drm_jax.methods.get_method("drm").param("coefficients"),)
    assert all(np.isfinite(np.asarray(merged[n])).all() for n in base)


DERIVED = {"drm": {"prune_counts"}, "knots_ties": {"prune_counts"}, "ties": {"prune_counts"},
           "dare_ties": {"dare_keep", "dare_scale"}, "dare_linear": {"dare_keep", "dare_scale"},
           "breadcrumbs": {"band_low", "band_count"}, "breadcrumbs_ties": {"band_low", "band_count"},
           "della": {"della_probabilities"}, "della_linear": {"della_probabilities"}}


@pytest.mark.parametrize("method", sorted(drm_jax.methods.METHODS))
def test_a_rule_reads_its_methods_declared_numbers(method):
    # a typed structure per method: its traced parameters (coefficients travel apart) and what the host hooks
    # beside the stages derive from them; a stage reading a number the method does not declare fails loudly
    spec, derived = get_method(method), DERIVED.get(method, set())
    static = static_values(spec, {})
    k = spec.max_models or 3
    numbers = spec.layer_hparams(traced_values(spec, {}), "matrix", (6, 5), k, static)
    traced = {p.name for p in spec.traced} - {"coefficients"}
    assert set(numbers._fields) <= traced | derived and derived <= set(numbers._fields)
    with pytest.raises(ValueError, match="does not declare"):
        number(numbers, "not_a_number")


def test_a_compositions_numbers_are_its_declared_traced_parameters():
    # like a registered method's: a typed structure holding exactly the composition's traced parameters
    # (coefficients travel apart) and what its stages' host hooks derive from them (prune(None)'s exact
    # counts, for the (3, 6, 5) deltas it receives), and a stage reading a number it does not declare fails
    # naming it
    spec = drm_jax.methods.method_spec(TRIMMED)
    numbers = spec.layer_hparams(traced_values(spec, {}), "matrix", (6, 5), 3, static_values(spec, {}))
    assert numbers._fields == ("density", "lambda_", "prune_counts")
    np.testing.assert_array_equal(numbers.prune_counts, pruning_counts(spec.param("density").default, 1, 30))
    assert float(number(numbers, "density")) == pytest.approx(spec.param("density").default)
    with pytest.raises(ValueError, match="does not declare"):
        number(numbers, "drop_rate")


# DRM's linear stages and TIES' tensor-scope stages written as compositions: their prune(None) reads the
# composition's density, and its exact counts come from the stage's host hook (`state.derives`), as the
# registered methods' do
DRM_STAGES = drm_jax.MergeMethod(
    linear=m.chain(m.joint_space("horizontal"), m.renormalize(), m.prune(None, scope="joint", rule="kthvalue"),
                   m.elect_sign("majority"), m.scale_by_coefficients(), m.disjoint_mean("count"), m.recompose(),
                   m.scale()),
    other=m.chain(drm_jax.methods.ties_like(), m.scale()))
TIES_STAGES = drm_jax.MergeMethod(
    linear=m.chain(m.prune(None, scope="per_task", rule="top_k"), m.scale_by_coefficients(), m.elect_sign("positive"),
                   m.disjoint_mean("coefficients"), m.scale()),
    other=m.chain(m.prune(None, scope="per_task", rule="top_k"), m.scale_by_coefficients(), m.elect_sign("positive"),
                  m.disjoint_mean("coefficients"), m.scale()))


def test_a_compositions_prune_counts_are_the_registered_methods():
    # at N = 45 entries (3 valid rows of the joint space, 15 entries each) and density 0.7 the host's float64
    # count keeps round(31.499999999999996) = 31, the program's float32 product rounds to 31.5 and kept 32:
    # the composition counted in the program, DRM on the host
    k, shape = 3, (5, 5)
    counts = {}
    for name, method in (("composition", DRM_STAGES), ("drm", "drm")):
        spec = drm_jax.methods.method_spec(method)
        values = traced_values(spec, spec.canonical({"density": 0.7}))
        counts[name] = np.asarray(spec.layer_hparams(values, "matrix", shape, k, static_values(spec, {})).prune_counts)
    np.testing.assert_array_equal(counts["composition"], counts["drm"])
    assert counts["composition"][3] == 45 - 31 != 45 - np.round(np.float32(45) * np.float32(0.7))


def ties_trees(seed=0, k=3):
    # leaves of 90 entries: density 0.7 keeps floor(62.99999999999999) = 62 on the host, 63 in float32
    rng = np.random.default_rng(seed)
    base = {"blocks.0.w": rng.standard_normal((9, 10)).astype(np.float32),
            "norm": rng.standard_normal(90).astype(np.float32)}
    models = [{n: v + rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()} for _ in range(k)]
    return base, models


def test_a_composition_equal_in_stages_to_ties_merges_bit_identically():
    base, models = ties_trees()
    got = drm_jax.merge(base, models, method=TIES_STAGES, density=0.7, lambda_=1.5)
    want = drm_jax.merge(base, models, method="ties", density=0.7, lambda_=1.5)
    for name in base:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
    # the value matters: counted in float32 (a traced density, in the program) the merge differs
    in_program = jax.jit(lambda d: drm_jax.merge(base, models, method="ties", density=d, lambda_=1.5))(0.7)
    assert any(not np.array_equal(np.asarray(in_program[n]), np.asarray(want[n])) for n in base)


def test_a_composition_with_a_rescaled_trim_equal_in_stages_to_ties_merges_bit_identically():
    # rescale_l1 wraps the trim: it reads the trim's density and carries its hook
    trim = m.chain(rescale_l1(m.prune(None, scope="per_task", rule="top_k")), m.scale_by_coefficients(),
                   m.elect_sign("positive"), m.disjoint_mean("coefficients"), m.scale())
    base, models = ties_trees(2)
    got = drm_jax.merge(base, models, method=drm_jax.MergeMethod(linear=trim, other=trim), density=0.7)
    want = drm_jax.merge(base, models, method="ties", density=0.7, rescale=True)
    for name in base:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


def test_a_composition_equal_in_stages_to_ties_merges_bit_identically_under_jit():
    # a traced density stays traced (counted in the program, float32, by both); a sweep compiles nothing new
    base, models = ties_trees(1)
    composed = drm_jax.prepare(base, models, method=TIES_STAGES)
    registered = drm_jax.prepare(base, models, method="ties")
    run_composed = jax.jit(lambda d: composed.merge(density=d, lambda_=1.5))
    run_registered = jax.jit(lambda d: registered.merge(density=d, lambda_=1.5))
    for density in (0.7, 0.3):
        got, want = run_composed(density), run_registered(density)
        for name in base:
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
    with counting_compiles() as count:
        run_composed(0.5)
    assert count[0] == 0


def test_two_numberless_prune_stages_in_one_chain_are_refused():
    # both would read the one prune_counts of the numbers, counted for one of them
    method = drm_jax.MergeMethod(
        linear=m.chain(m.prune(None, scope="per_task"), m.prune(None, scope="joint"), m.elect_sign(),
                       m.disjoint_mean(), m.scale()),
        other=drm_jax.methods.ties_like())
    base, models = trees()
    with pytest.raises(MergeInputError, match="two stages of one chain derive 'prune_counts'"):
        drm_jax.merge(base, models, method=method, density=0.5)


def test_a_composition_equal_in_stages_to_dare_linear_merges_bit_identically():
    # drop rate 0.9: the host's keep probability float32(1 - 0.9) = 0.1 and factor 10, the program's
    # 1 - 0.9f = 0.100000024 and 9.9999976; the composition's dare_drop(None) now takes the host's (its hooks)
    dare = m.chain(m.dare_drop(None), m.scale_by_coefficients(), m.sum_tasks(), m.scale())
    base, models = trees(4)
    got = drm_jax.merge(base, models, method=drm_jax.MergeMethod(linear=dare, other=dare), drop_rate=0.9, seed=3)
    want = drm_jax.merge(base, models, method="dare_linear", drop_rate=0.9, seed=3)
    for name in base:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


# Breadcrumbs' and DELLA's sparsifiers built without numbers: their band counts and probabilities per rank come
# from the stages' host hooks (`state.derives`), as the registered methods' do
def _crumbs(consensus, rescale=False):
    band = rescale_l1(m.magnitude_band(None, None)) if rescale else m.magnitude_band(None, None)
    stages = m.chain(band, m.generalized_reduce(consensus, False), m.scale())
    return drm_jax.MergeMethod(linear=stages, other=stages)


def _della(consensus, normalize, rule):
    stages = m.chain(m.ranked_drop(None, None, True, rule), m.generalized_reduce(consensus, normalize), m.scale())
    return drm_jax.MergeMethod(linear=stages, other=stages)


@pytest.mark.parametrize("name, composition, rescale", [("breadcrumbs", _crumbs(False), False),
                                                        ("breadcrumbs_ties", _crumbs(True), False),
                                                        ("breadcrumbs", _crumbs(False, True), True)])
def test_a_composition_equal_in_stages_to_breadcrumbs_merges_bit_identically(name, composition, rescale):
    # leaves of 90 entries at density 0.7 and gamma 0.1: the host keeps floor(62.99999999999999) = 62 from
    # rank 90 - 62 - 9 = 19 on, float32 would keep 63 from rank 18 (failed before: the composition could not
    # read the band's counts, "only its registered method computes")
    assert np.floor(np.float32(0.7) * np.float32(90)) == 63
    np.testing.assert_array_equal(np.stack(band_counts(0.7, 0.1, 90)), [19, 62])
    base, models = ties_trees(5)
    got = drm_jax.merge(base, models, method=composition, density=0.7, gamma=0.1, lambda_=1.5)
    want = drm_jax.merge(base, models, method=name, density=0.7, gamma=0.1, lambda_=1.5, rescale=rescale)
    for leaf in base:
        np.testing.assert_array_equal(np.asarray(got[leaf]), np.asarray(want[leaf]), err_msg=leaf)
    # the value matters: counted in float32 (a traced density, in the program) the merge differs
    in_program = jax.jit(lambda d: drm_jax.merge(base, models, method=name, density=d, gamma=0.1, lambda_=1.5,
                                                 rescale=rescale))(0.7)
    assert any(not np.array_equal(np.asarray(in_program[n]), np.asarray(want[n])) for n in base)


@pytest.mark.parametrize("name, consensus, normalize", [("della", True, True), ("della_linear", False, False)])
@pytest.mark.parametrize("rule", ["l1", "inverse"])
def test_a_composition_equal_in_stages_to_della_merges_bit_identically(name, consensus, normalize, rule):
    # density 0.6, epsilon 0.2: the host's float64 probabilities of the ranks of rows of 10 and 90 entries,
    # rounded once, are not all the float32 program's (failed before: the composition could not read
    # DELLA's probabilities, "only its registered method computes"); with the paper's rescale each survivor
    # is divided by its own probability, so the merge shows every one of them
    for shape in ((3, 9, 10), (3, 90)):
        in_program = jax.jit(lambda d, e: rank_probabilities(d, e, shape))(0.6, 0.2)
        assert not np.array_equal(np.asarray(in_program), np.asarray(rank_probabilities(0.6, 0.2, shape)))
    base, models = ties_trees(6)
    got = drm_jax.merge(base, models, method=_della(consensus, normalize, rule), density=0.6, epsilon=0.2, seed=3,
                        lambda_=1.5)
    want = drm_jax.merge(base, models, method=name, density=0.6, epsilon=0.2, seed=3, lambda_=1.5, rescale_rule=rule)
    for leaf in base:
        np.testing.assert_array_equal(np.asarray(got[leaf]), np.asarray(want[leaf]), err_msg=leaf)


def test_a_della_composition_under_jit_equals_the_registered_method():
    # traced numbers stay traced: the probabilities are computed in the program (float32) by both
    base, models = ties_trees(7)
    composed = drm_jax.prepare(base, models, method=_della(False, False, "inverse"), seed=3)
    registered = drm_jax.prepare(base, models, method="della_linear", seed=3, rescale_rule="inverse")
    got = jax.jit(lambda d, e: composed.merge(density=d, epsilon=e))(0.6, 0.2)
    want = jax.jit(lambda d, e: registered.merge(density=d, epsilon=e))(0.6, 0.2)
    for leaf in base:
        np.testing.assert_array_equal(np.asarray(got[leaf]), np.asarray(want[leaf]), err_msg=leaf)


def test_a_compositions_band_and_probabilities_are_its_stages_hooks():
    # the composition's numbers carry what the hooks derive at the (3, 9, 10) deltas the stages receive
    k, shape = 3, (9, 10)
    crumbs = drm_jax.methods.method_spec(_crumbs(False))
    values = traced_values(crumbs, crumbs.canonical({"density": 0.7, "gamma": 0.1}))
    numbers = crumbs.layer_hparams(values, "matrix", shape, k, static_values(crumbs, {}))
    assert numbers._fields == ("density", "gamma", "lambda_", "band_low", "band_count")
    np.testing.assert_array_equal([numbers.band_low, numbers.band_count], band_counts(0.7, 0.1, 90))
    della = drm_jax.methods.method_spec(_della(True, True, "l1"))
    values = traced_values(della, della.canonical({"density": 0.7, "epsilon": 0.2}))
    numbers = della.layer_hparams(values, "matrix", shape, k, static_values(della, {}))
    assert numbers._fields == ("density", "epsilon", "lambda_", "della_probabilities")
    np.testing.assert_array_equal(numbers.della_probabilities, rank_probabilities(0.7, 0.2, (k,) + shape))
    assert numbers.della_probabilities.shape == (k, 10)  # one per rank of a row (the input axis)


def test_fixed_numbers_band_and_probabilities_equal_the_numberless_stages():
    # magnitude_band(density, gamma) and ranked_drop(density, epsilon) count on the host when traced
    base, models = ties_trees(8)
    fixed = m.chain(m.magnitude_band(0.7, 0.1), m.generalized_reduce(False, False), m.scale())
    got = drm_jax.merge(base, models, method=drm_jax.MergeMethod(linear=fixed, other=fixed), lambda_=1.5)
    want = drm_jax.merge(base, models, method="breadcrumbs", density=0.7, gamma=0.1, lambda_=1.5)
    for leaf in base:
        np.testing.assert_array_equal(np.asarray(got[leaf]), np.asarray(want[leaf]), err_msg=leaf)
    fixed = m.chain(m.ranked_drop(0.7, 0.2, True, "inverse"), m.generalized_reduce(False, False), m.scale())
    got = drm_jax.merge(base, models, method=drm_jax.MergeMethod(linear=fixed, other=fixed), seed=3)
    want = drm_jax.merge(base, models, method="della_linear", density=0.7, epsilon=0.2, seed=3, rescale_rule="inverse")
    for leaf in base:
        np.testing.assert_array_equal(np.asarray(got[leaf]), np.asarray(want[leaf]), err_msg=leaf)
    with pytest.raises(ValueError, match="both density and gamma"):
        m.magnitude_band(0.7)
    with pytest.raises(ValueError, match="both density and epsilon"):
        m.ranked_drop(0.7)
