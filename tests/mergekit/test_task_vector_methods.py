"""mergekit 0.1.5's task-vector methods in drm_jax: breadcrumbs, breadcrumbs_ties, della, della_linear, sce,
ram, ramplus_tl, and the parity of ties, dare_*, task_arithmetic and linear (docs/methods.md).

(a) float64 NumPy references written from the definitions in docs/methods.md, against `drm_jax.prepare` /
    `merge`, unjitted and inside the caller's jit (every number traced); (b) the deterministic methods
    through `drm-jax merge` against mergekit's `mergekit-yaml` code path (its click command, one subprocess for
    all configs) on tiny Llama checkpoints, every tensor; (c) the random methods by their statistics (JAX's
    PRNG cannot reproduce torch's draws): keep rates, rescaling, DELLA's keep probability by magnitude rank,
    and the L1 norms both tools must preserve.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import drm_jax
from compile_count import counting_compiles
from drm_jax.cli.main import main
from drm_jax.errors import MergeInputError

CONFIGS_DIR = Path(__file__).parent / "configs"  # in the shape of mergekit's examples
REPO = Path(__file__).resolve().parents[2]


# -- float64 references (docs/methods.md#generalized-task-arithmetic and the methods' sections) ----------
def ref_band(x, density, gamma):
    """Breadcrumbs' mask: ascending magnitude ranks [low, low + count) (ties by position)."""
    flat = np.abs(x).ravel()
    n = flat.size
    count, top = int(density * n), int(gamma * n)
    low = max(0, n - count - top)
    keep = np.zeros(n, bool)
    keep[np.argsort(flat, kind="stable")[low:low + count]] = True
    return keep.reshape(x.shape)


def ref_topk(x, density):
    """mergekit's `magnitude` trim: the max(1, floor(density n)) largest magnitudes (density < 1)."""
    if density >= 1:
        return np.ones(x.shape, bool)
    flat = np.abs(x).ravel()
    k = max(1, int(density * flat.size)) if density > 0 else 0
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(x.shape)


def ref_l1(x, kept):
    before, after = np.abs(x).sum(), np.abs(kept).sum()
    return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept


def ref_reduce(d, w, consensus, normalize, lam):
    """Generalized task arithmetic after the sparsifier."""
    w = np.asarray(w, np.float64)
    wb = w.reshape((-1,) + (1,) * (d.ndim - 1))
    x = d * wb
    if consensus:
        agree = np.sign(x) == np.where(x.sum(0) >= 0, 1.0, -1.0)[None]
        mixed = (x * agree).sum(0)
        divisor = (wb * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = x.sum(0)
        divisor = w.sum() if abs(w.sum()) >= 1e-8 else 1.0
    return lam * (mixed / divisor if normalize else mixed)


def ref_breadcrumbs(d, density, gamma, w, consensus, normalize, rescale, lam):
    sparse = []
    for t in range(d.shape[0]):
        kept = np.where(ref_band(d[t], density[t], gamma[t]), d[t], 0.0)
        sparse.append(ref_l1(d[t], kept) if rescale else kept)
    return ref_reduce(np.stack(sparse), w, consensus, normalize, lam)


def ref_ties(d, density, w, normalize, rescale, lam):
    sparse = []
    for t in range(d.shape[0]):
        kept = np.where(ref_topk(d[t], density[t]), d[t], 0.0)
        sparse.append(ref_l1(d[t], kept) if rescale else kept)
    return ref_reduce(np.stack(sparse), w, True, normalize, lam)


def ref_sce(d, topk, scales=None):
    k = d.shape[0]
    if scales is not None:
        d = d * np.asarray(scales, np.float64).reshape((-1,) + (1,) * (d.ndim - 1))
    if topk < 1:
        var = d.var(axis=0)
        n_keep = int(np.floor(np.float32(np.count_nonzero(var)) * np.float32(topk)))
        mask = np.zeros(var.size, bool)
        mask[np.argsort(-var.ravel(), kind="stable")[:n_keep]] = True
        d = d * mask.reshape(var.shape)[None]
    agree = np.sign(d) == np.where(d.sum(0) >= 0, 1.0, -1.0)[None]
    energy = (d ** 2).reshape(k, -1).mean(1)
    weights = np.full(k, 1.0 / k) if abs(energy.sum()) < 1e-6 else energy / energy.sum()
    ew = weights.reshape((-1,) + (1,) * (d.ndim - 1)) * agree
    return (d * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


def ref_ram(d, eps, plus=None):
    k = d.shape[0]
    active = np.abs(d) > eps
    count = active.sum(0)
    kept = np.where(active, d, 0.0)
    unique, overlap = count == 1, count > 1
    boost = np.ones(k)
    if plus is not None:
        r, alpha = plus
        shared = (active & overlap[None]).reshape(k, -1).sum(1)
        alone = (active & unique[None]).reshape(k, -1).sum(1)
        boost = 1 + r * np.clip(shared / np.maximum(alone, eps), 0, alpha)
    boost = boost.reshape((-1,) + (1,) * (d.ndim - 1))
    return (kept * unique * boost + kept * overlap / np.maximum(count, 1)).sum(0)


# -- trees ------------------------------------------------------------------------------------------------
def trees(seed=0, k=3, zero_leaf=True):
    rng = np.random.default_rng(seed)
    # one leaf per shape: each shape is one compiled program (the command-line tests merge 4 layers)
    base = {"layers.0.w": rng.standard_normal((16, 12)).astype(np.float32)}
    base["layers.0.norm"] = rng.standard_normal(16).astype(np.float32)
    scales = [0.05, 0.1, 0.2, 0.15][:k]
    models = [{n: v + (s * rng.standard_normal(v.shape)).astype(np.float32) for n, v in base.items()} for s in scales]
    if zero_leaf:
        models[-1]["layers.0.norm"] = base["layers.0.norm"].copy()  # a leaf this model leaves unchanged
    return base, models


def deltas64(base, models, name):
    return np.stack([(m[name] - base[name]).astype(np.float64) for m in models])


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


K3 = [0.7, 1.0, 0.4]
CASES = {
    "breadcrumbs": (dict(), dict(density=[0.6, 0.5, 0.8], gamma=[0.05, 0.1, 0.0], lambda_=0.9), K3,
                    lambda d, v, c: ref_breadcrumbs(d, v["density"], v["gamma"], c, False, False, False, 0.9)),
    "breadcrumbs-normalize-rescale": (
        dict(normalize=True, rescale=True), dict(density=[0.6, 0.5, 0.8], gamma=[0.05, 0.1, 0.3], lambda_=1.1), K3,
        lambda d, v, c: ref_breadcrumbs(d, v["density"], v["gamma"], c, False, True, True, 1.1)),
    "breadcrumbs_ties-sum": (dict(rescale=True), dict(density=[0.7, 0.4, 0.9], gamma=[0.02, 0.2, 0.05], lambda_=0.8),
                             K3, lambda d, v, c: ref_breadcrumbs(d, v["density"], v["gamma"], c, True, False, True, 0.8)),
    "sce": (dict(), dict(select_topk=0.4), [1.0, 1.0, 1.0], lambda d, v, c: ref_sce(d, 0.4)),
    "sce-scaled": (dict(), dict(select_topk=0.7), K3, lambda d, v, c: ref_sce(d, 0.7, c)),
    "sce-all": (dict(), dict(select_topk=1.0), [1.0, 1.0, 1.0], lambda d, v, c: ref_sce(d, 1.0)),
    "ram": (dict(), dict(epsilon=0.08), K3,
            lambda d, v, c: ref_ram(d * np.reshape(c, (-1,) + (1,) * (d.ndim - 1)), 0.08)),
    "ramplus_tl": (dict(), dict(epsilon=0.08, r=0.3, alpha=0.5), [1.0, 1.0, 1.0],
                   lambda d, v, c: ref_ram(d, 0.08, (0.3, 0.5))),
    "ramplus_tl-capped": (dict(), dict(epsilon=0.01, r=0.5, alpha=0.05), K3,
                          lambda d, v, c: ref_ram(d * np.reshape(c, (-1,) + (1,) * (d.ndim - 1)), 0.01, (0.5, 0.05))),
    "ties-rescale": (dict(rescale=True), dict(density=[0.5, 0.3, 0.8], lambda_=0.9), K3,
                     lambda d, v, c: ref_ties(d, v["density"], c, True, True, 0.9)),
}


def _method(case):
    return case.split("-")[0]


# inside the caller's jit too where the traced path differs (counts computed on the device)
JITTED = {"breadcrumbs", "breadcrumbs_ties-sum", "sce", "ramplus_tl", "ties-rescale"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_the_float64_reference_unjitted_and_jitted(case):
    static, values, coefficients, reference = CASES[case]
    base, models = trees(1)
    prepared = drm_jax.prepare(base, models, method=_method(case), **static)
    results = [prepared.merge(coefficients=coefficients, **values)]
    if case in JITTED:
        traced_values = {n: jnp.asarray(v, jnp.float32) for n, v in values.items()}
        results.append(jax.jit(lambda c, v: prepared.merge(coefficients=c, **v))(
            jnp.asarray(coefficients, jnp.float32), traced_values))
    for name in base:
        want = base[name] + reference(deltas64(base, models, name), values, coefficients)
        for got in results:
            assert rel(got[name], want) < 2e-6, name


# -- edge cases --------------------------------------------------------------------------------------------
def _delta(out, base, name):
    return np.asarray(out[name], np.float64) - base[name]


def test_breadcrumbs_edge_cases():
    base, models = trees(2, zero_leaf=False)
    name = "layers.0.w"
    d = deltas64(base, models, name)
    # density 0 keeps nothing; density 1 keeps everything, whatever gamma (the band starts at rank 0)
    assert np.all(_delta(drm_jax.merge(base, models, method="breadcrumbs", density=0.0), base, name) == 0)
    full = drm_jax.merge(base, models, method="breadcrumbs", density=1.0, gamma=0.3)
    assert rel(_delta(full, base, name), d.sum(0)) < 1e-6
    # density + gamma > 1: fewer outliers are dropped, the smallest kept (the band starts at rank 0)
    out = drm_jax.merge(base, models, method="breadcrumbs", density=0.9, gamma=0.3)
    n = d[0].size
    for t in range(3):
        mask = ref_band(d[t], 0.9, 0.3)
        assert mask.sum() == int(0.9 * n) and np.abs(d[t])[mask].max() < np.sort(np.abs(d[t]).ravel())[-1]
    assert rel(_delta(out, base, name), ref_breadcrumbs(d, [0.9] * 3, [0.3] * 3, [1.0] * 3, False, False, False,
                                                         1.0)) < 1e-6
    # drop_rate is density's other side
    a = drm_jax.merge(base, models, method="breadcrumbs", density=0.75, gamma=0.05)
    b = drm_jax.merge(base, models, method="breadcrumbs", drop_rate=0.25, gamma=0.05)
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_sce_edge_cases():
    base, models = trees(3, zero_leaf=False)
    # one model: every variance is 0, so a selection below 1 keeps nothing (mergekit: k = 0)
    one = drm_jax.merge(base, models[:1], method="sce", select_topk=0.5)
    for name in base:
        np.testing.assert_array_equal(np.asarray(one[name]), base[name])
    # tiny task vectors (sum of mean squares < 1e-6): the weights are uniform, 1 / K each
    zero = {n: np.zeros_like(v) for n, v in base.items()}
    tiny = [{n: ((v - base[n]) * np.float32(1e-4)).astype(np.float32) for n, v in m.items()} for m in models]
    out = drm_jax.merge(zero, tiny, method="sce")
    name, base = "layers.0.w", zero
    d = deltas64(base, tiny, name)
    assert (d ** 2).reshape(3, -1).mean(1).sum() < 1e-6
    assert rel(_delta(out, base, name), ref_sce(d, 1.0)) < 1e-5
    # a weight given to sce on the command line is refused (mergekit's sce takes none)
    from drm_jax.config.schema import parse_config
    from drm_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.weight: unknown per-model parameter"):
        parse_config({"merge_method": "sce", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1}}]})


def test_ramplus_without_unique_entries_caps_the_ratio():
    base, models = trees(4, zero_leaf=False)
    same = [{n: v.copy() for n, v in models[0].items()} for _ in range(2)]  # every active entry overlaps
    out = drm_jax.merge(base, same, method="ramplus_tl", epsilon=0.0, r=0.5, alpha=0.3)
    for name in base:
        d = deltas64(base, same, name)
        # no unique entries: RAM+ is RAM, the mean of equal values (rho = shared / epsilon is capped)
        assert rel(_delta(out, base, name), d[0]) < 1e-6
    ram = drm_jax.merge(base, models, method="ram", epsilon=0.0)
    name = "layers.0.w"
    assert rel(_delta(ram, base, name), deltas64(base, models, name).mean(0)) < 1e-6  # all overlap: the mean


def test_della_refuses_a_band_outside_zero_one():
    base, models = trees(5)
    with pytest.raises(MergeInputError, match=r"della: model 1 has density 0.9 and epsilon 0.15"):
        drm_jax.merge(base, models, method="della", density=[0.5, 0.9, 0.5])
    # density 1 leaves the task vectors as they are (no draw, no rescale): della is TIES without a trim
    out = drm_jax.merge(base, models, method="della", density=1.0, epsilon=0.5, coefficients=K3)
    for name in base:
        d = deltas64(base, models, name)
        assert rel(_delta(out, base, name), ref_reduce(d, K3, True, True, 1.0)) < 1e-6


# -- traced numbers: a new value compiles nothing ------------------------------------------------------------


GRIDS = {
    "breadcrumbs": [{"density": d, "gamma": g, "lambda_": 0.5} for d in (0.3, 0.6, [0.2, 0.5, 0.9]) for g in (0.0, 0.1)],
    "della": [{"density": d, "epsilon": e} for d in (0.4, 0.6, [0.3, 0.5, 0.7]) for e in (0.05, 0.2)],
    "sce": [{"select_topk": s} for s in (0.2, 0.5, 0.9, 1.0)],
    "ramplus_tl": [{"epsilon": e, "r": r, "alpha": a} for e in (1e-3, 0.05) for r in (0.1, 0.4) for a in (0.2, 1.0)],
}


@pytest.mark.parametrize("method", sorted(GRIDS))
def test_new_numbers_compile_nothing(method):
    base, models = trees(6)
    prepared = drm_jax.prepare(base, models, method=method)
    grid = GRIDS[method]
    prepared.merge(**grid[0])
    with counting_compiles() as count:
        for values in grid[1:]:
            prepared.merge(coefficients=[0.5, 1.0, 1.5], **values)
    assert count[0] == 0, f"{count[0]} compilations over the grid"


# -- (c) the random methods by their statistics --------------------------------------------------------------
def _big(seed=7, shape=(512, 64)):
    rng = np.random.default_rng(seed)
    base = {"w": np.zeros(shape, np.float32)}
    # distinct magnitudes in every row, so the ranks are those of the values
    model = {"w": (rng.standard_normal(shape) * 0.1).astype(np.float32)}
    return base, model


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keep_rate_and_both_rescalings(method):
    base, model = _big()
    d = model["w"].astype(np.float64)
    for rule in ("l1", "inverse"):
        out = np.asarray(drm_jax.merge(base, [model], method=method, density=0.3, rescale_rule=rule, seed=4)["w"],
                         np.float64)
        kept = out != 0
        assert abs(kept.mean() - 0.3) < 0.01
        if rule == "l1":  # mergekit: the delta keeps its L1 norm
            assert abs(np.abs(out).sum() / np.abs(d).sum() - 1) < 1e-5
            factor = np.abs(d).sum() / np.abs(d[kept]).sum()
        else:  # the paper: 1 / density
            factor = 1 / 0.3
        assert rel(out[kept], d[kept] * factor) < 1e-5


def test_della_keep_probability_follows_the_magnitude_rank():
    base, model = _big()
    d = model["w"].astype(np.float64)
    density, epsilon = 0.5, 0.2
    ranks = np.argsort(np.argsort(np.abs(d), axis=1), axis=1)  # per row, along the input axis
    n = d.shape[1]
    out = np.asarray(drm_jax.merge(base, [model], method="della_linear", density=density, epsilon=epsilon,
                                   rescale=False, seed=2)["w"], np.float64)
    kept = out != 0
    np.testing.assert_array_equal(out[kept], d[kept])  # no rescaling
    want = density - epsilon + 2 * epsilon * ranks / (n - 1)
    for lo in range(0, n, 8):  # 8 ranks x 512 rows per bucket: sd of the rate about 0.008
        bucket = (ranks >= lo) & (ranks < lo + 8)
        assert abs(kept[bucket].mean() - want[bucket].mean()) < 0.035, lo
    assert abs(kept.mean() - density) < 0.01
    # mergekit's rescale keeps the L1 norm; the paper's divides each survivor by its own probability
    l1 = np.asarray(drm_jax.merge(base, [model], method="della_linear", density=density, epsilon=epsilon, seed=2)["w"],
                    np.float64)
    np.testing.assert_array_equal(l1 != 0, kept)  # same draws for the same seed and name
    assert abs(np.abs(l1).sum() / np.abs(d).sum() - 1) < 1e-5
    inverse = np.asarray(drm_jax.merge(base, [model], method="della_linear", density=density, epsilon=epsilon,
                                       rescale_rule="inverse", seed=2)["w"], np.float64)
    assert rel(inverse[kept], d[kept] / want[kept]) < 1e-5


# -- (b) against mergekit on tiny Llama checkpoints ------------------------------------------------------------
TASKS = ("task_a", "task_b", "task_c")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama (4 layers) saved with save_pretrained(safe_serialization=True): base and three tasks."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("mk_family")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(root / "base", safe_serialization=True)
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for t, name in enumerate(TASKS):
        gen = torch.Generator().manual_seed(100 + t)
        tuned = {k: v + (0.01 * (t + 1)) * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        if name == "task_c":  # a tensor this model leaves as it is: zero deltas, ties among them
            tuned["model.norm.weight"] = state["model.norm.weight"].clone()
        model = transformers.LlamaForCausalLM(config).eval()
        model.load_state_dict(tuned)
        model.save_pretrained(root / name, safe_serialization=True)
    return root


def _cfg(method, models, parameters=None, base=True):
    out = {"merge_method": method, "models": models, "dtype": "float32"}
    if base:
        out["base_model"] = "base"
    if parameters:
        out["parameters"] = parameters
    return out


def _m(name, **parameters):
    return {"model": name, "parameters": parameters} if parameters else {"model": name}


# deterministic methods: every tensor must agree
MK_CONFIGS = {
    "breadcrumbs": _cfg("breadcrumbs", [_m("task_a", weight=0.6, density=0.6, gamma=0.05),
                                        _m("task_b", weight=0.3, density=0.5),
                                        _m("task_c", weight=0.5, density=0.8, gamma=0.0)],
                        {"gamma": 0.1, "lambda": 0.9}),
    "breadcrumbs_ties": _cfg("breadcrumbs_ties", [_m("task_a", weight=0.5, density=0.5),
                                                  _m("task_b", weight=0.7, density=0.7, gamma=0.2),
                                                  _m("task_c", weight=0.4, density=0.4)],
                             {"gamma": 0.02, "normalize": True, "rescale": True, "lambda": 1.1}),
    "sce": _cfg("sce", [_m("task_a"), _m("task_b"), _m("task_c")], {"select_topk": 0.4, "int8_mask": True}),
    "ram": _cfg("ram", [_m("task_a"), _m("task_b"), _m("task_c")], {"epsilon": 0.01}),
    "ramplus_tl": _cfg("ramplus_tl", [_m("task_a"), _m("task_b"), _m("task_c")],
                       {"epsilon": 0.01, "r": 0.4, "alpha": 0.6}),
    "task_arithmetic": _cfg("task_arithmetic", [_m("task_a", weight=0.7, density=0.3), _m("task_b", weight=0.5)],
                            {"lambda": 0.8, "normalize": True}),
    "linear": _cfg("linear", [_m("task_a", weight=0.7), _m("task_b", weight=0.5), _m("task_c", weight=0.2)],
                   {"normalize": True}, base=False),
}
# random methods with one model: both tools keep each tensor's L1 norm (times the weight) exactly
MK_RANDOM = {
    "della_linear": _cfg("della_linear", [_m("task_a", weight=0.8, density=0.4, epsilon=0.2)]),
}
# configs in the shape of mergekit's own examples (tests/mergekit/configs), model names -> local checkpoints
SHARED_MAPS = {
    "ties.yml": {"task_a": "task_a", "task_b": "task_b", "task_c": "task_c", "base": "base"},
    "bio-merge.yml": {"task_a": "task_a", "task_b": "task_b", "base": "base"},
}


def _localized(raw, root: Path, names: dict):
    if isinstance(raw, dict):
        return {k: _localized(v, root, names) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_localized(v, root, names) for v in raw]
    if isinstance(raw, str) and raw in names:
        return str(root / names[raw])
    return raw


def _all_configs(root: Path) -> dict:
    local = {"base", *TASKS}
    configs = {name: _localized(c, root, {n: n for n in local}) for name, c in {**MK_CONFIGS, **MK_RANDOM}.items()}
    for file, names in SHARED_MAPS.items():
        configs[file] = _localized(yaml.safe_load((CONFIGS_DIR / file).read_text()), root, names)
        # the same merge computed in float32: the method's semantics without float16 arithmetic
        configs[file + "@float32"] = {**configs[file], "dtype": "float32"}
    return configs


# mergekit-yaml's command (its click entry point), once per config, in one interpreter
_DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
args = sys.argv[1:]
for config, out in zip(args[::2], args[1::2]):
    main([config, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--random-seed", "0"],
         standalone_mode=False)
"""


@pytest.fixture(scope="module")
def outputs(family, tmp_path_factory):
    """{config name: (mergekit's output dir, ours, our exit status)} for every config."""
    pytest.importorskip("mergekit")
    work = tmp_path_factory.mktemp("mk_runs")
    configs = _all_configs(family)
    args, result = [], {}
    for name, raw in configs.items():
        path = work / f"{name.replace('.', '_')}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        theirs, ours = work / f"mk_{path.stem}", work / f"ours_{path.stem}"
        args += [str(path), str(theirs)]
        result[name] = (path, theirs, ours)
    proc = subprocess.run([sys.executable, "-c", _DRIVER, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: _Ours(path, theirs, ours) for name, (path, theirs, ours) in result.items()}


class _Ours:
    """mergekit's output dir and ours, `drm-jax merge` run on first use (in the test that needs it)."""

    def __init__(self, config: Path, theirs: Path, ours: Path):
        self.config, self.theirs, self.ours, self._status = config, theirs, ours, None

    def __iter__(self):
        if self._status is None:
            self._status = main(["merge", str(self.config), str(self.ours), "--quiet"])
        return iter((self.theirs, self.ours, self._status))


def _load(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _compare(theirs: dict, ours: dict, rtol: float) -> list[str]:
    """Tensors that differ beyond rtol (relative to the tensor's largest magnitude), with counts."""
    bad = []
    for name in sorted(theirs):
        a, b = theirs[name].astype(np.float64), ours[name].astype(np.float64)
        off = np.abs(a - b) > rtol * max(np.abs(a).max(), 1e-30)
        if off.any():
            bad.append(f"{name}: {int(off.sum())} of {off.size} entries, max {np.abs(a - b).max():.3g}")
    return bad


def _needs_yaml_features(name: str, status: int):
    if name.startswith("ties.yml") and status != 0:
        pytest.xfail("ties.yml's gradients and filter lists belong to the YAML-features work, not landed here")
    if name == "bio-merge.yml" and status != 0:
        pytest.xfail("bio-merge.yml's float16 compute dtype belongs to the YAML-features work, not landed here")


def _at_tied_thresholds(raw: dict, root: Path, theirs: dict, ours: dict) -> tuple[int, list[str]]:
    """TIES in float16 (mergekit's `dtype`): the deltas are float16 numbers, so exact magnitude ties at a
    trim threshold are common; mergekit keeps exactly k of them by its sort order, we keep them all.
    Returns (differing entries, those not explained so), where an entry is explained when it sits at a
    tied trim threshold of one of the models: exactly (the threshold computed from a model's constant
    density) or, for a model whose density varies per layer, at a magnitude tied within the tensor."""
    base = _load(root / "base")
    models = [(_load(Path(m["model"])), m.get("parameters", {}).get("density", raw["parameters"].get("density", 1.0)))
              for m in raw["models"]]
    differing, unexplained = 0, []
    for name in sorted(theirs):
        a, b = theirs[name].astype(np.float64), ours[name].astype(np.float64)
        off = np.abs(a - b) > 1e-5 * max(np.abs(a).max(), 1e-30)
        if not off.any():
            continue
        differing += int(off.sum())
        explained = np.zeros(off.shape, bool)
        for weights, density in models:
            mag = np.abs(weights[name].astype(np.float16) - base[name].astype(np.float16)).astype(np.float32)
            if isinstance(density, (int, float)):
                k = max(1, int(density * mag.size)) if 0 < density < 1 else None
                if k is None:
                    continue
                threshold = np.sort(mag.ravel())[::-1][k - 1]
                if np.sum(mag >= threshold) > k:  # a tie at the threshold
                    explained |= mag == threshold
            else:
                values, counts = np.unique(mag, return_counts=True)
                explained |= np.isin(mag, values[counts > 1])
        if (off & ~explained).any():
            unexplained.append(f"{name}: {int((off & ~explained).sum())} entries")
    return differing, unexplained


@pytest.mark.optional
@pytest.mark.parametrize("name", sorted(MK_CONFIGS) + sorted(f"{f}{v}" for f in SHARED_MAPS for v in ("", "@float32")))
def test_every_tensor_agrees_with_mergekit(name, outputs, family):
    theirs_dir, ours_dir, status = outputs[name]
    _needs_yaml_features(name, status)
    assert status == 0
    theirs, ours = _load(theirs_dir), _load(ours_dir)
    assert set(theirs) == set(ours)
    for n in theirs:
        assert ours[n].dtype == theirs[n].dtype, n
    if name in SHARED_MAPS:  # dtype: float16, computed in float16 as mergekit does
        raw = yaml.safe_load(outputs[name].config.read_text())
        differing, unexplained = _at_tied_thresholds(raw, family, theirs, ours)
        if unexplained and name == "bio-merge.yml":
            pytest.xfail(f"float16 compute dtype not matched yet: {unexplained[:3]}")
        assert not unexplained, unexplained
        assert differing < 1e-3 * sum(t.size for t in theirs.values())  # a handful, all ties
        return
    bad = _compare(theirs, ours, 1e-5)
    assert not bad, bad


@pytest.mark.optional
@pytest.mark.parametrize("name", sorted(MK_RANDOM))
def test_random_methods_agree_with_mergekit_in_norm_and_keep_rate(name, outputs, family):
    theirs_dir, ours_dir, status = outputs[name]
    assert status == 0
    theirs, ours = _load(theirs_dir), _load(ours_dir)
    base = _load(family / "base")
    task = _load(family / "task_a")
    kept = {"theirs": [0, 0], "ours": [0, 0]}
    for n in base:
        d = task[n].astype(np.float64) - base[n]
        for who, out in (("theirs", theirs), ("ours", ours)):
            merged = out[n].astype(np.float64) - base[n]
            # each tensor's delta keeps 0.8 x its L1 norm (weight 0.8, rescale to the L1 norm)
            assert abs(np.abs(merged).sum() / (0.8 * np.abs(d).sum()) - 1) < 1e-4, (who, n)
            kept[who][0] += int(np.sum(np.abs(merged) > 0))
            kept[who][1] += merged.size
    for who, (k, total) in kept.items():
        assert abs(k / total - 0.4) < 0.02, (who, k / total)


def test_the_command_line_takes_mergekit_defaults():
    from drm_jax.config.schema import parse_config
    from drm_jax.config.recipe import build_recipe

    from drm_jax.methods.registry import get_method

    def recipe(method, **parameters):  # every parameter's value as the engine will use it
        given = build_recipe(parse_config(_cfg(method, [_m("a", **parameters), _m("b")]))).engine_kwargs
        return get_method(method).with_defaults(given)

    # DARE rescales to the L1 norm, as mergekit 0.1.5 does (the Python API keeps the paper's 1 / density)
    assert recipe("dare_linear", density=0.5)["rescale_rule"] == "l1"
    assert recipe("dare_ties")["drop_rate"] == 0.0  # mergekit: nothing dropped unless a density is given
    della = recipe("della", density=0.5, epsilon=0.1, weight=0.3)
    assert della["density"] == (0.5, 1.0) and della["epsilon"] == (0.1, 0.15) and della["rescale_rule"] == "l1"
    assert della["normalize"] is True and della["rescale"] is True and della["coefficients"] == [0.3, 1.0]
    crumbs = recipe("breadcrumbs", gamma=0.2)
    assert crumbs["gamma"] == (0.2, 0.01) and crumbs["density"] == 1.0 and crumbs["normalize"] is False
    assert recipe("breadcrumbs_ties")["normalize"] is False and recipe("della_linear")["normalize"] is False
    assert recipe("task_arithmetic", density=0.2)["density"] == (0.2, 1.0)  # accepted, no effect (as mergekit)
    assert recipe("ties", density=0.3)["rescale"] is False and recipe("sce")["select_topk"] == 1.0
    assert recipe("ramplus_tl")["r"] == 0.1 and recipe("ramplus_tl")["alpha"] == 0.2
    assert recipe("ram")["epsilon"] == 1e-5


def test_cli_della_band_error_is_one_line(family, tmp_path, capsys):
    config = tmp_path / "della.yaml"
    config.write_text(yaml.safe_dump(_localized(
        _cfg("della", [_m("task_a", density=0.9), _m("task_b", density=0.5)]), family, {"base": "base",
                                                                                          "task_a": "task_a",
                                                                                          "task_b": "task_b"})))
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "density - epsilon and density + epsilon must lie in (0, 1)" in err[0]
    assert not (tmp_path / "out").exists()


# -- the registry against mergekit's own ------------------------------------------------------------------------
OURS = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl",
        "ties", "dare_ties", "dare_linear", "task_arithmetic", "linear")


@pytest.mark.optional
@pytest.mark.parametrize("method", OURS)
def test_parameters_and_defaults_are_mergekits(method):
    """Every parameter of mergekit's method is accepted under its name, with mergekit's default on the
    command line (a model's weight excepted: mergekit has none, we take 1); nothing mergekit lacks is
    accepted from a model entry but the documented extensions."""
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry as mk_registry
    from mergekit.merge_methods.base import MISSING, ParameterScope

    from drm_jax.config.schema import per_model_names
    from drm_jax.methods.registry import get_method

    theirs = {p.name: p for p in mk_registry.get(method).spec.parameters}
    spec = get_method(method)
    by_name = {n: p for p in spec.params for n in (p.name,) + p.aliases}
    for name, p in theirs.items():
        assert name in by_name, f"{method}: mergekit's {name!r} is not accepted"
        ours = by_name[name]
        if p.scope != ParameterScope.SHARED:
            assert name in per_model_names(method), f"{method}: {name} must be accepted per model"
        if p.default is MISSING:
            continue  # weight: required by mergekit
        default = ours.mergekit_default if ours.mergekit_default is not None else ours.default
        if name != ours.name and name in dict(ours.alias_maps):
            default = dict(ours.alias_maps)[name](default)
        assert default == pytest.approx(p.default), f"{method}.{name}: {default} vs mergekit's {p.default}"
    # per-model names we accept that mergekit's method lacks: only our documented extensions
    extra = set(per_model_names(method)) - set(theirs)
    assert extra <= {"coefficients", "drop_rate", "density"}, extra
    assert ("weight" in per_model_names(method)) == ("weight" in theirs)


def test_every_cited_anchor_is_in_the_method_reference():
    from drm_jax.methods.registry import get_method

    text = (REPO / "docs" / "methods.md").read_text()
    for method in OURS[:7]:
        spec = get_method(method)
        anchor = spec.reference.split("#")[1]
        assert f'<a id="{anchor}"></a>' in text, anchor
        assert spec.mergekit and spec.paper and spec.needs_base
        assert all(p.traced for p in spec.params if p.kind in ("fraction", "float")), method
    for anchor in ("generalized-task-arithmetic", "rescale", "mergekit-parity"):
        assert f'<a id="{anchor}"></a>' in text, anchor
