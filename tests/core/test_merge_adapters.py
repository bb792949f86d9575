"""`drm_jax.merge_adapters`: LoRA adapters merged in factored form (docs/methods.md#lora-factored).

The reference is the materialised merge, `drm_jax.merge` over the models base + s_t B_t A_t, minus the base.
The factored path never forms an (n, m) delta; at rank=None its adapter is exact (1e-5 relative), and its
result depends only on the deltas, not on how they are factored (sign flips, rotations, zero padding) nor
on the order of the adapters.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import drm_jax
from compile_count import counting_compiles
from drm_jax import LoraWeight
from drm_jax.errors import MergeInputError

PROPERTY = settings(max_examples=6, deadline=None)
K, R = 3, 2
SHAPES = {"layers.0.q.weight": (24, 16), "layers.1.q.weight": (24, 16), "embed_tokens.weight": (20, 16)}
COEFFICIENTS = [0.6, 1.0, 1.4]
FACTORED = [("drm", {"drop_rate": 0.7}), ("drm", {"direction": "vertical", "drop_rate": 0.6}),
            ("knots_ties", {"drop_rate": 0.7}), ("tsv_m", {"alpha": 1.3}), ("iso_c", {"alpha": 0.9}),
            ("iso_cts", {"alpha": 1.1})]
LINEAR = [("task_arithmetic", {"lambda_": 0.7}), ("linear", {})]


def make(seed=0, missing=True):
    """A base and K adapters of rank R (adapter 2 lacks layers.1.q when `missing`)."""
    rng = np.random.default_rng(seed)
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    adapters = []
    for t in range(K):
        adapter = {}
        for n, (o, i) in SHAPES.items():
            if missing and t == 2 and n == "layers.1.q.weight":
                continue
            adapter[n] = LoraWeight(0.3 * rng.standard_normal((o, R)).astype(np.float32),
                                    (rng.standard_normal((R, i)) / 4).astype(np.float32), float(rng.uniform(1, 2)))
        adapters.append(adapter)
    return base, adapters


def delta_of(w: LoraWeight) -> np.ndarray:
    d = w.scale * (np.asarray(w.b, np.float64) @ np.asarray(w.a, np.float64))
    return d.T if w.transposed else d


def materialised(base, adapters, method, **kwargs):
    """drm_jax.merge over base + s B A, minus the base, per adapted weight."""
    models = [{n: (base[n] + delta_of(a[n])).astype(np.float32) if n in a else base[n] for n in base} for a in adapters]
    merged = drm_jax.merge(base, models, method=method, **kwargs)
    return {n: np.asarray(merged[n], np.float64) - base[n] for n in base}


def rel(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


@pytest.mark.parametrize("method, params", FACTORED + LINEAR, ids=lambda x: x if isinstance(x, str) else "")
def test_factored_path_equals_the_materialised_merge(method, params):
    base, adapters = make()
    result = drm_jax.merge_adapters(base, adapters, method=method, coefficients=COEFFICIENTS, **params)
    want = materialised(base, adapters, method, coefficients=COEFFICIENTS, **params)
    for name in ("layers.0.q.weight", "layers.1.q.weight"):
        w = result.adapter[name]
        assert result.paths[name] == ("concatenated" if (method, params) in LINEAR else "factored")
        assert w.scale == 1.0 and w.b.shape == (24, K * R) and w.a.shape == (K * R, 16)  # rank K r exactly
        assert result.discarded[name] == 0.0
        assert rel(np.asarray(w.b) @ np.asarray(w.a), want[name]) < 1e-5, name
    # the embedding takes the method's other rule: exact where that rule is linear or the rank suffices
    if (method, params) in LINEAR or method in ("tsv_m", "iso_c", "iso_cts"):
        w = result.adapter["embed_tokens.weight"]
        assert rel(np.asarray(w.b) @ np.asarray(w.a), want["embed_tokens.weight"]) < 1e-5


@pytest.mark.parametrize("method, params", [("drm", {"drop_rate": 0.7}), ("ties", {"density": 0.4}),
                                            ("ties", {"density": 0.3, "trim_scope": "model"})])
def test_formed_path_at_full_rank_equals_the_full_merge(method, params):
    """Leaves without a factored rule are formed one at a time; at rank min(n, m) nothing is discarded
    (TIES' whole-model trim: thresholds from the streamed passes over every formed weight)."""
    base, adapters = make(1)
    result = drm_jax.merge_adapters(base, adapters, method=method, rank=16, coefficients=COEFFICIENTS, **params)
    want = materialised(base, adapters, method, coefficients=COEFFICIENTS, **params)
    names = ["embed_tokens.weight"] if method == "drm" else list(SHAPES)
    for name in names:
        assert result.paths[name] == "dense"
        w = result.adapter[name]
        assert rel(np.asarray(w.b) @ np.asarray(w.a), want[name]) < 1e-5, name
        assert result.discarded[name] < 1e-10


def test_requested_rank_is_the_best_approximation_and_reports_the_discarded_energy():
    base, adapters = make(2)
    full = drm_jax.merge_adapters(base, adapters, method="tsv_m")
    cut = drm_jax.merge_adapters(base, adapters, method="tsv_m", rank=3)
    for name in ("layers.0.q.weight", "embed_tokens.weight"):
        exact = np.asarray(full.adapter[name].b, np.float64) @ np.asarray(full.adapter[name].a, np.float64)
        u, s, vh = np.linalg.svd(exact)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        w = cut.adapter[name]
        assert w.b.shape[1] == 3 and rel(np.asarray(w.b) @ np.asarray(w.a), best) < 1e-5
        np.testing.assert_allclose(cut.discarded[name], np.sum(s[3:] ** 2) / np.sum(s ** 2), rtol=1e-4)
    # the formed path's default rank is K r too, with its cut reported
    drm = drm_jax.merge_adapters(base, adapters, method="drm")
    assert drm.adapter["embed_tokens.weight"].b.shape[1] == K * R and drm.discarded["embed_tokens.weight"] > 0


def _refactored(adapters, rng, pad: int):
    """The same deltas, factored otherwise: B Q and Q^T A for a random orthogonal Q (signs included), and
    `pad` zero columns of B / rows of A."""
    out = []
    for adapter in adapters:
        new = {}
        for n, w in adapter.items():
            q, _ = np.linalg.qr(rng.standard_normal((R, R)))
            b = np.pad(np.asarray(w.b) @ q, ((0, 0), (0, pad)))
            a = np.pad(q.T @ np.asarray(w.a), ((0, pad), (0, 0)))
            new[n] = LoraWeight(b.astype(np.float32), a.astype(np.float32), w.scale)
        out.append(new)
    return out


def _products(result):
    return {n: np.asarray(w.b, np.float64) @ np.asarray(w.a, np.float64) for n, w in result.adapter.items()}


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), perm=st.permutations(range(K)), pad=st.integers(0, 1),
       case=st.sampled_from(FACTORED))
def test_task_order_and_the_factors_convention_do_not_matter(seed, perm, pad, case):
    method, params = case
    base, adapters = make(seed % 7, missing=False)
    reference = _products(drm_jax.merge_adapters(base, adapters, method=method, coefficients=COEFFICIENTS, **params))
    permuted = drm_jax.merge_adapters(base, [adapters[p] for p in perm], method=method,
                                      coefficients=[COEFFICIENTS[p] for p in perm], **params)
    other = _refactored(adapters, np.random.default_rng(seed), pad)
    refactored = drm_jax.merge_adapters(base, other, method=method, coefficients=COEFFICIENTS, **params)
    for name in ("layers.0.q.weight", "layers.1.q.weight"):
        assert rel(_products(permuted)[name], reference[name]) < 1e-5
        assert rel(_products(refactored)[name], reference[name]) < 1e-5


def test_transposed_weights_follow_the_layout():
    """GPT-2 style: base weights stored (in, out) (layout flax), PEFT's fan_in_fan_out factors (update
    (B A)^T); the merge is the materialised one in the stored layout."""
    base, adapters = make(3)
    base = {n: v.T.copy() if n.startswith("layers") else v for n, v in base.items()}
    flipped = [{n: w._replace(transposed=n.startswith("layers")) for n, w in a.items()} for a in adapters]
    result = drm_jax.merge_adapters(base, flipped, method="drm", layout="flax", drop_rate=0.7)
    want = materialised(base, flipped, "drm", layout="flax", drop_rate=0.7)
    w = result.adapter["layers.0.q.weight"]
    assert w.transposed and result.paths["layers.0.q.weight"] == "factored"
    assert rel((np.asarray(w.b) @ np.asarray(w.a)).T, want["layers.0.q.weight"]) < 1e-5


def test_hyperparameters_are_traced():
    base, adapters = make(4)
    drm_jax.merge_adapters(base, adapters, method="drm", drop_rate=0.5, lambda_=1.0)
    sweep = [dict(drop_rate=p, lambda_=lam, coefficients=c) for p, lam, c in
             [(0.8, 0.5, [1.0, 0.5, 2.0]), (0.9, 1.5, [0.3, 1.0, 1.0])]]
    with counting_compiles() as compiles:
        [drm_jax.merge_adapters(base, adapters, method="drm", **v) for v in sweep]
    assert compiles[0] == 0
    # and inside the caller's jit (traced coefficients): the same factors
    eager = drm_jax.merge_adapters(base, adapters, method="iso_c", coefficients=[0.5, 1.0, 2.0])

    @jax.jit
    def run(c):
        out = drm_jax.merge_adapters(base, adapters, method="iso_c", coefficients=c)
        return {n: (w.b, w.a) for n, w in out.adapter.items()}

    traced = run(jnp.array([0.5, 1.0, 2.0]))
    for name, w in eager.adapter.items():
        got = np.asarray(traced[name][0]) @ np.asarray(traced[name][1])
        assert rel(got, np.asarray(w.b, np.float64) @ np.asarray(w.a, np.float64)) < 1e-5


def test_bad_adapters_name_the_adapter_and_the_weight():
    base, adapters = make(5)
    w = adapters[1]["layers.0.q.weight"]
    cases = [
        ({"nope.weight": w}, r"adapter 1: weight 'nope.weight' is not a leaf of the base model"),
        ({"layers.0.q.weight": LoraWeight(w.a.T, w.b.T, 1.0)}, r"adapter 1: weight 'layers.0.q.weight': the LoRA "
                                                                 r"update has shape \(16, 24\), the base weight \(24, 16\)"),
        ({"layers.0.q.weight": LoraWeight(np.full_like(w.b, np.nan), w.a, 1.0)}, "adapter 1: weight "
                                                                                 "'layers.0.q.weight' contains NaN"),
        ({"layers.0.q.weight": (w.b, w.a[:1])}, r"LoRA factors need B \(out, r\) and A \(r, in\)"),
    ]
    for bad, message in cases:
        with pytest.raises(MergeInputError, match=message):
            drm_jax.merge_adapters(base, [adapters[0], bad], method="drm")
    with pytest.raises(MergeInputError, match="rank must be a positive integer"):
        drm_jax.merge_adapters(base, adapters, rank=0)
    with pytest.raises(MergeInputError, match="one coefficient per adapter"):
        drm_jax.merge_adapters(base, adapters, coefficients=[1.0, 2.0])
    with pytest.raises(MergeInputError, match="unknown parameter 'densty'"):
        drm_jax.merge_adapters(base, adapters, method="ties", densty=0.3)


def test_base_may_be_shapes_only_and_tuples_are_factors():
    base, adapters = make(6)
    shapes = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in base.items()}
    as_tuples = [{n: (w.b, w.a, w.scale) for n, w in a.items()} for a in adapters]
    got = _products(drm_jax.merge_adapters(shapes, as_tuples, method="knots_ties"))
    want = _products(drm_jax.merge_adapters(base, adapters, method="knots_ties"))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)


def test_peft_reader_factors_round_trip_through_the_writer(tmp_path):
    """PeftReader.lora_weights gives the factors of its deltas; write_lora_adapter writes PEFT's keys and
    config, for linear, fan_in_fan_out and embedding modules alike."""
    from drm_jax.io.peft_io import PeftReader, write_lora_adapter

    rng = np.random.default_rng(7)
    weights = {"model.layers.0.q_proj.weight": (rng.standard_normal((6, 2)), rng.standard_normal((2, 5)), False),
               "model.embed_tokens.weight": (rng.standard_normal((9, 3)), rng.standard_normal((3, 4)), False)}
    for fan_in_fan_out in (False, True):
        out = tmp_path / f"adapter{int(fan_in_fan_out)}"
        write_lora_adapter(out, weights, embeddings={"model.embed_tokens.weight"}, fan_in_fan_out=fan_in_fan_out)
        reader = PeftReader(out)
        assert reader.config["r"] == reader.config["lora_alpha"] == 3
        assert reader.is_embedding("model.embed_tokens.weight")
        assert not reader.is_embedding("model.layers.0.q_proj.weight")
        factors = reader.lora_weights()
        assert all(isinstance(w, LoraWeight) for w in factors.values())  # the documented form
        for name, (b, a, _) in weights.items():
            want = b @ a  # the update in the orientation given (transposed=False)
            np.testing.assert_allclose(reader.delta(name), want, rtol=1e-6, atol=1e-6)
            fb, fa, scale, transposed = factors[name].b, factors[name].a, factors[name].scale, factors[name].transposed
            product = scale * fb @ fa
            np.testing.assert_allclose(product.T if transposed else product, want, rtol=1e-6, atol=1e-6)
        assert factors["model.embed_tokens.weight"][3] and factors["model.layers.0.q_proj.weight"][3] == fan_in_fan_out
        reader.close()


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5})])
def test_a_lossy_rank_cut_is_warned_of_naming_the_weights(method, params):
    base, adapters = make(3)
    with pytest.warns(UserWarning, match="discards more than 1%") as caught:
        result = drm_jax.merge_adapters(base, adapters, method=method, **params)
    lossy = [n for n, d in result.discarded.items() if d > 0.01]
    assert lossy  # what the warning is about: the sparsified deltas have more than K r directions
    message = str(caught[-1].message)
    assert all(repr(n) in message for n in lossy) and f"{len(lossy)} weight(s)" in message


def test_an_exact_merge_warns_nothing():
    base, adapters = make(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = drm_jax.merge_adapters(base, adapters, method="task_arithmetic")
    assert max(result.discarded.values()) < 1e-10
