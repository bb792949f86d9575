"""`drm_jax.merge_adapters`: LoRA adapters merged in factored form, into one LoRA adapter.

An adapter in memory is a mapping from the names of the base weights it changes (the dotted names
`drm_jax.merge` gives the base's leaves) to `LoraWeight(b, a, scale, transposed)`: the weight's update is
scale * B @ A (B: (out, r), A: (r, in), PEFT's lora_B / lora_A and scaling lora_alpha / r, or
lora_alpha / sqrt(r) with rslora), stored transposed, scale * (B @ A)^T, where `transposed` (GPT-2's
Conv1D with fan_in_fan_out, embeddings). A plain tuple (b, a[, scale[, transposed]]) is read the same way,
and so is what `drm_jax.io.peft_io.PeftReader.lora_weights()` returns (a reader itself is accepted too).

`merge_adapters(base, adapters, method=..., rank=None, **params)` merges K adapters as `drm_jax.merge`
merges the models base + delta_t (same parameters, roles, per-tensor seeds), leaf by leaf
(docs/methods.md#lora-factored):

* methods with a factored rule (`Rules.factored`: DRM-H/V, KnOTS-TIES, TSV-M, Iso-C, Iso-CTS) merge the
  2-D weights of their linear path from the factors alone: the joint decomposition of the factored stack
  (QR of the stacked factors, cost O((n + K m)(K r)^2)), never an (n, m) delta. The merged delta
  left @ right has rank at most K r: an exact LoRA weight of rank K r, or, with `rank`, its best rank-`rank`
  approximation (the discarded share of the squared singular values is reported);
* rules that are linear combinations of the task vectors (task arithmetic, linear): the merged delta is
  sum_t w_t s_t B_t A_t, exactly the concatenated factors [B_1 ... B_K], [w_1 s_1 A_1; ...] (rank K r);
* every other method or leaf (TIES, DARE, the DRM family's other leaves, ...): the K deltas of one leaf
  are formed (one leaf at a time), merged by the method's rule and truncated to `rank` (default K r) by
  an SVD, with the discarded energy reported.

Methods whose merged model is not base + a function of the task vectors (`MethodSpec.reads_base`: slerp,
karcher, arcee_fusion, passthrough) are refused with `AdapterMethodError` naming the method
(docs/methods.md#lora-factored), so the base's values are never read: the base may be a tree of
`jax.ShapeDtypeStruct`s. Every number is traced as in `drm_jax.merge`: a sweep compiles nothing new.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.engine import roles as roles_lib
from drm_jax.engine.compiled import is_traced
from drm_jax.engine.endpoints import Source, streamed_thresholds
from drm_jax.engine.executors import decompose
from drm_jax.engine.options import MergeOptions, split_keywords
from drm_jax.engine.plan import leaf_key, make_plan, plan_chunks, plan_roles
from drm_jax.engine.prepare import resolve, rules_for
from drm_jax.engine.tree import flatten, tree_list
from drm_jax.errors import AdapterMethodError, MergeInputError, quote
from drm_jax.math import lowrank
from drm_jax.math.lowrank import LoraWeight
from drm_jax.math.select import whole_model_thresholds
from drm_jax.methods.base import FactoredRule, LayerContext, LayerRule, MethodSpec, Rules, per_model_values
from drm_jax.methods.registry import traced_values
from drm_jax.numbers import is_finite_number


DISCARDED_WARNING = 0.01  # share of a merged weight's squared singular values above which the cut is warned of


class MergedAdapter(NamedTuple):
    """What `merge_adapters` returns.

    adapter: name -> LoraWeight with scale 1.0 (the merged update is B @ A, transposed as the base
      weight is stored), for every merged weight (weights whose role is "ignore" keep their base value
      and are left out).
    discarded: name -> the share of the merged delta's squared singular values the rank cut dropped
      (0 where the adapter is exact).
    paths: name -> "factored", "concatenated" (concatenated factors) or "dense" (formed and truncated).
    """

    adapter: dict[str, LoraWeight]
    discarded: dict[str, Any]
    paths: dict[str, str]


def as_adapter(adapter: Any, index: int) -> dict[str, LoraWeight]:
    """One adapter in the in-memory form (module docstring); MergeInputError naming it otherwise."""
    if hasattr(adapter, "lora_weights"):  # a PeftReader
        adapter = adapter.lora_weights()
    if not isinstance(adapter, Mapping):
        raise MergeInputError(f"adapter {index}: expected a mapping of weight names to LoRA factors "
                              f"(LoraWeight or (B, A, scale)), got {type(adapter).__name__}")
    out = {}
    for name, weight in adapter.items():
        if isinstance(weight, Mapping):
            weight = LoraWeight(weight["lora_B"], weight["lora_A"], weight.get("scale", 1.0),
                                bool(weight.get("transposed", False)))
        elif isinstance(weight, tuple) and not isinstance(weight, LoraWeight) and 2 <= len(weight) <= 4:
            weight = LoraWeight(*weight)
        elif not isinstance(weight, LoraWeight):
            raise MergeInputError(f"adapter {index}: {name!r}: expected LoRA factors (B, A, scale), got "
                                  f"{type(weight).__name__}")
        b, a = weight.b, weight.a
        if np.ndim(b) != 2 or np.ndim(a) != 2 or np.shape(b)[1] != np.shape(a)[0]:
            raise MergeInputError(f"adapter {index}: {name!r}: LoRA factors need B (out, r) and A (r, in), got "
                                  f"{tuple(np.shape(b))} and {tuple(np.shape(a))}")
        out[name] = weight
    return out


def _stored_shape(w: LoraWeight) -> tuple[int, int]:
    shape = (int(np.shape(w.b)[0]), int(np.shape(w.a)[1]))
    return shape[::-1] if w.transposed else shape


def _canonical(w: LoraWeight, transpose: bool) -> tuple[Any, Any]:
    """(B, A) with scale * B @ A the update in the engine's (out, in) orientation of the leaf."""
    b, a = jnp.asarray(w.b, jnp.float32), jnp.asarray(w.a, jnp.float32)
    return (b, a) if bool(w.transposed) == bool(transpose) else (a.T, b.T)


def _stack(weights: list[LoraWeight | None], transpose: bool, shape: tuple[int, int]):
    """B (K, n, r), A (K, r, m), scales (K,): every task padded to the largest rank with zero factors (exact),
    an adapter without this weight as zero factors of scale 0."""
    r = max(int(np.shape(w.b)[1]) for w in weights if w is not None)
    n, m = shape
    bs, as_, scales = [], [], []
    for w in weights:
        if w is None:
            bs.append(jnp.zeros((n, r), jnp.float32))
            as_.append(jnp.zeros((r, m), jnp.float32))
            scales.append(0.0)
            continue
        b, a = _canonical(w, transpose)
        pad = r - b.shape[1]
        bs.append(jnp.pad(b, ((0, 0), (0, pad))))
        as_.append(jnp.pad(a, ((0, pad), (0, 0))))
        scales.append(w.scale)
    return jnp.stack(bs), jnp.stack(as_), jnp.stack([jnp.asarray(s, jnp.float32) for s in scales])


def _dtype(leaf):
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.result_type(leaf)


def _x64(enabled: bool):
    return jax.enable_x64(True) if enabled and not jax.config.jax_enable_x64 else contextlib.nullcontext()


# -- the three paths, one layer each (jit caches by the static rule and the shapes) ---------------------
@functools.partial(jax.jit, static_argnames=("rule",))
def _factored_prepare(rule: FactoredRule, b, a, scales):
    return rule.prepare(b, a, scales)


@functools.partial(jax.jit, static_argnames=("rule", "rank"))
def _factored_merge(rule: FactoredRule, prepared, coefficients, key, hparams, rank: int | None):
    left, right = rule.merge(prepared, LayerContext(coefficients, key, None, hparams, None))
    return lowrank.to_lora_factors(left, right, rank)


@functools.partial(jax.jit, static_argnames=("rule", "rank"))
def _linear_merge(rule: LayerRule, b, a, scales, coefficients, key, hparams, rank: int | None):
    """A rule linear in the task vectors: its weights w_t read off the merge of unit task vectors."""
    k, n, r = b.shape
    probe = jnp.eye(k, dtype=b.dtype)
    w = rule.merge(probe, LayerContext(coefficients, key, None, hparams, None))  # no base: reads_base is refused
    left = jnp.transpose(b, (1, 0, 2)).reshape(n, k * r)
    right = ((w * scales)[:, None, None] * a).reshape(k * r, a.shape[2])
    if rank is None:
        return left, right, jnp.zeros((), b.dtype)
    return lowrank.to_lora_factors(left, right, rank)


@functools.partial(jax.jit, static_argnames=("rule",))
def _dense_prepare(rule: LayerRule, deltas):
    return jax.vmap(rule.prepare)(deltas[None])


@functools.partial(jax.jit, static_argnames=("rule", "rank"))
def _dense_merge(rule: LayerRule, prepared, coefficients, key, threshold, hparams, base, rank: int):
    merged = rule.merge(prepared, LayerContext(coefficients, key, threshold, hparams, base))
    return lowrank.dense_to_lora(merged, rank)


def adapter_method_problem(spec: MethodSpec, rules: Rules, *, whole_weights: bool = False) -> str | None:
    """Why LoRA adapters of one base cannot be merged into one adapter by this method (with the static
    parameters `rules` were built for), or None: its merged model must be base + a function of the task
    vectors alone (`MethodSpec.reads_base` says it is not). whole_weights: the model merge to agree with
    merges whole weights over a zero base (the command line's `linear`): the method must then be
    shift-equivariant (`Rules.shift_equivariant`), or the base would count once per model."""
    if spec.reads_base:
        return (f"method {spec.name!r} merges the weights themselves (its result depends on the base model's "
                f"weights, not only on the task vectors), so no merge of the adapters gives it; merge the "
                f"adapted models instead")
    if spec.leaf_data:
        return (f"method {spec.name!r} reads per-leaf data of the full weights "
                f"({', '.join(d.name for d in spec.leaf_data)}), which the adapter path does not carry; merge the "
                f"adapted models instead")
    if whole_weights and not rules.shift_equivariant:
        return (f"method {spec.name!r} here merges whole weights (the base model's included) over a zero base, "
                f"which is not base + a merge of the adapters' updates; merge the adapted models instead")
    return None


def _check_rank(rank) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise MergeInputError(f"rank must be a positive integer or None, got {rank!r}")
    return int(rank)


def _coefficients(coefficients, k: int):
    if coefficients is None or isinstance(coefficients, (int, float)) and not isinstance(coefficients, bool):
        if coefficients is not None and not is_finite_number(coefficients):
            raise MergeInputError(f"coefficients must be finite, got {quote(coefficients)}")
        return np.full(k, 1.0 if coefficients is None else float(coefficients), np.float32)
    if is_traced(coefficients):
        c = jnp.asarray(coefficients, jnp.float32)
    else:
        if isinstance(coefficients, (list, tuple)) and not all(map(is_finite_number, coefficients)):
            raise MergeInputError(f"coefficients must be finite numbers, got {quote(coefficients)}")
        c = np.asarray(coefficients, np.float64)
        if not np.all(np.isfinite(c)):
            raise MergeInputError(f"coefficients must be finite, got {c.tolist()}")
        c = c.astype(np.float32)
    if c.shape != (k,):
        raise MergeInputError(f"merge_adapters takes one coefficient per adapter, shape ({k},); got {tuple(c.shape)}")
    return c


def merge_adapters(base: Any, adapters: Sequence[Any], method: Any = "drm", rank: int | None = None, *,
                   options: MergeOptions | None = None, **keywords: Any) -> MergedAdapter:
    """Merge K LoRA adapters of one base model into one LoRA adapter (module docstring).

    The result equals `drm_jax.merge(base, [base + delta_t ...], method, ...)` minus the base on every
    adapted weight (to the rank cut, which is exact at rank=None for the factored and linear paths).

    Args:
      base: the base model's tree (arrays, or `jax.ShapeDtypeStruct`s: only the leaves' names, shapes and
        dtypes are read; TIES' whole-model trim counts the merged leaves no adapter changes).
      adapters: K adapters, each a mapping name -> LoraWeight / (B, A, scale[, transposed]), or a
        `PeftReader` (module docstring). Names are the base's dotted leaf names.
      method: a method in any form `drm_jax.merge` takes (a registered name, a `MethodSpec`, a `MergeMethod`).
      rank: the rank of every merged weight; None: K r exactly where the merge factors (r the largest
        input rank of the weight), and K r for the formed path too (truncated, reported).
      options, **keywords: as in `drm_jax.merge` (the layout and leaf patterns of `MergeOptions`; the
        method's parameters, `coefficients` one per adapter). A keyword the method does not take raises.

    Returns:
      MergedAdapter(adapter, discarded, paths).

    Raises:
      AdapterMethodError (a MergeInputError): a method whose merge reads the base weights (slerp, karcher,
        arcee_fusion, passthrough: `MethodSpec.reads_base`), which no adapter carries.
      MergeInputError: an adapted weight the base lacks, factors whose product does not have the weight's
        shape, NaN/Inf in any factor or in a merged weight, bad parameters; the error names the adapter
        and the weight.
    """
    adapters = [as_adapter(a, i) for i, a in enumerate(tree_list(adapters, "adapters", "adapter"))]
    k = len(adapters)
    if k == 0:
        raise MergeInputError("no adapters to merge")
    rank = _check_rank(rank)
    options, keywords = split_keywords(keywords, options)
    spec, static, traced = resolve(method, keywords)
    rules = rules_for(spec, static)
    problem = adapter_method_problem(spec, rules)
    if problem is not None:
        raise AdapterMethodError(problem)
    values = traced_values(spec, traced)
    coeffs = _coefficients(values.pop("coefficients", None), k)
    traced_mode = is_traced(coeffs, values)

    flat = flatten(base)
    index = {n: i for i, n in enumerate(flat.names)}
    for t, adapter in enumerate(adapters):
        for name, w in adapter.items():
            if name not in index:
                raise MergeInputError(f"adapter {t}: weight {name!r} is not a leaf of the base model")
            want = tuple(np.shape(flat.leaves[index[name]]))
            if _stored_shape(w) != want:
                raise MergeInputError(f"adapter {t}: weight {name!r}: the LoRA update has shape {_stored_shape(w)}, "
                                      f"the base weight {want}")
            if not traced_mode and not (np.all(np.isfinite(np.asarray(w.b, np.float32)))
                                        and np.all(np.isfinite(np.asarray(w.a, np.float32)))
                                        and is_finite_number(w.scale) and np.isfinite(np.float32(w.scale))):
                raise MergeInputError(f"adapter {t}: weight {name!r} contains NaN or Inf")
    names = [n for n in flat.names if any(n in a for a in adapters)]
    shapes = [tuple(np.shape(flat.leaves[index[n]])) for n in names]
    dtypes = [_dtype(flat.leaves[index[n]]) for n in names]
    largest = max((min(s) for s in shapes), default=0)
    if rank is not None and rank > largest:  # checked before the factors are padded to it
        raise MergeInputError(f"rank {quote(rank)} is larger than any adapted weight's rank can be (at most "
                              f"{largest}, the smaller side of the largest weight)")
    role_rules = roles_lib.RoleRules(include=options.include, exclude=options.exclude, ignore=options.ignore,
                                     layout=options.layout)
    role_rules.check_matched(flat.names)
    roles = [role_rules(n, s, d) for n, s, d in zip(names, shapes, dtypes)]
    seed_value = static.get("seed", 0)

    merged, discarded, paths = {}, {}, {}
    dense: list[int] = []
    for i, (name, shape, role) in enumerate(zip(names, shapes, roles)):
        if role.role in ("ignore", "not_floating"):
            continue
        canonical = shape[::-1] if role.transpose else shape
        rule = rules.linear if role.role == "matrix" else rules.other
        hparams = spec.layer_hparams(values, role.role, canonical, k, static)
        key = leaf_key(seed_value, name)
        b, a, scales = _stack([ad.get(name) for ad in adapters], role.transpose, canonical)
        if role.role == "matrix" and rules.factored is not None:
            with _x64(rules.factored.x64):
                prepared = _factored_prepare(rules.factored, b, a, scales)
            out = _factored_merge(rules.factored, prepared, coeffs, key, hparams, rank)
            paths[name] = "factored"
        elif rules.linear_combination:
            out = _linear_merge(rule, b, a, scales, coeffs, key, hparams, rank)
            paths[name] = "concatenated"
        else:
            dense.append(i)
            continue
        merged[name], discarded[name] = out[:2], out[2]

    if dense:
        # TIES' whole-model trim counts every merged entry of the model: the leaves no adapter changes are zeros
        # of every task vector (drm_jax.merge's thresholds see them), so they take part in the thresholds too
        adapted = set(names)
        unadapted = [] if rules.whole_model_trim_param is None else [
            tuple(np.shape(leaf)) for n, leaf in zip(flat.names, flat.leaves)
            if n not in adapted and role_rules(n, tuple(np.shape(leaf)), _dtype(leaf)).role in ("matrix", "other")]
        _merge_dense_leaves(spec, static, traced, values, rules, adapters, names, shapes, dtypes, roles,
                            dense, coeffs, rank, seed_value, traced_mode, merged, discarded, paths, unadapted)

    result = {}
    for name in names:
        if name not in merged:
            continue
        b, a = merged[name]
        if not traced_mode and not (bool(jnp.all(jnp.isfinite(b))) and bool(jnp.all(jnp.isfinite(a)))):
            raise MergeInputError(f"weight {name!r}: the merged value overflows (Inf or NaN) although every "
                                  f"input is finite; lower the coefficients or lambda")
        result[name] = LoraWeight(b, a, 1.0, roles[names.index(name)].transpose)
        if not traced_mode:
            discarded[name] = float(discarded[name])
    lossy = {n: discarded[n] for n in result if not traced_mode and discarded[n] > DISCARDED_WARNING}
    if lossy:  # the returned `.discarded` alone went unread: say it where the user looks
        worst = sorted(lossy, key=lossy.get, reverse=True)
        listed = ", ".join(f"{n!r} ({lossy[n]:.1%})" for n in worst[:5]) + (", ..." if len(worst) > 5 else "")
        warnings.warn(f"merge_adapters: the rank cut discards more than {DISCARDED_WARNING:.0%} of the merged "
                      f"update's energy in {len(lossy)} weight(s): {listed}; pass a larger rank, or merge the "
                      f"adapted models (drm_jax.merge) for the exact result", stacklevel=2)
    return MergedAdapter(result, {n: discarded[n] for n in result}, {n: paths[n] for n in result})


def _merge_dense_leaves(spec: MethodSpec, static, traced, values, rules, adapters, names, shapes, dtypes,
                        roles, dense, coeffs, rank, seed_value, traced_mode, merged, discarded, paths,
                        unadapted: list[tuple[int, ...]]) -> None:
    """The formed path: each leaf's K deltas (in its stored layout for the thresholds, canonical for the
    merge) one leaf at a time, merged by the method's rule, truncated by an SVD. unadapted: the shapes of
    the merged leaves no adapter changes (zero deltas in the whole-model thresholds)."""
    k = len(adapters)

    def delta(t: int, i: int):
        w = adapters[t].get(names[i])
        if w is None:
            return jnp.zeros(shapes[i], jnp.float32)
        d = jnp.float32(w.scale) * jnp.matmul(jnp.asarray(w.b, jnp.float32), jnp.asarray(w.a, jnp.float32),
                                              precision="highest")
        return d.T if w.transposed else d

    threshold = None
    if rules.whole_model_trim_param is not None:  # TIES' whole-model trim: thresholds over every formed leaf
        density = per_model_values(values[rules.whole_model_trim_param], k, rules.whole_model_trim_param)
        if traced_mode:
            per_task = tuple(jnp.stack([delta(t, i).reshape(-1) for t in range(k)]) for i in dense)
            per_task += tuple(jnp.zeros((k, int(np.prod(s))), jnp.float32) for s in unadapted)
            threshold = whole_model_thresholds(per_task, jnp.asarray(density, jnp.float32))
        else:
            sub = [names[i] for i in dense] + [f"unadapted.{j}" for j in range(len(unadapted))]
            sub_shapes = [shapes[i] for i in dense] + list(unadapted)
            sub_dtypes = [np.float32] * len(sub)

            def sub_delta(t: int, j: int):
                return np.asarray(delta(t, dense[j])) if j < len(dense) else np.zeros(sub_shapes[j], np.float32)

            whole = MergeOptions(exclude=(), max_group_bytes=None)
            leaf_roles, groups = plan_roles(sub, sub_shapes, sub_dtypes, whole)
            plan = make_plan(sub, plan_chunks(groups, leaf_roles, sub, sub_dtypes, k, 0, whole), k)
            threshold = streamed_thresholds(Source(lambda j: np.zeros(sub_shapes[j], np.float32), sub_delta), plan,
                                            np.asarray(density, np.float64))

    for i in dense:
        name, role = names[i], roles[i]
        canonical = shapes[i][::-1] if role.transpose else shapes[i]
        rule = rules.linear if role.role == "matrix" else rules.other
        deltas = jnp.stack([delta(t, i).T if role.transpose else delta(t, i) for t in range(k)])
        if rule.prepare is None:
            prepared = deltas
        else:
            with _x64(rule.x64):
                prepared = decompose(rule, _dense_prepare, rule, deltas)
            if rule.shrink is not None:
                prepared = rule.shrink(prepared)
            prepared = jax.tree.map(lambda x: x[0], prepared)
        out_rank = rank if rank is not None else min(min(canonical),
                                                     k * max(int(np.shape(a[name].b)[1]) for a in adapters if name in a))
        hparams = spec.layer_hparams(values, role.role, canonical, k, static)
        # no base weights (None): the methods that would read them are refused (`adapter_method_problem`)
        out = _dense_merge(rule, prepared, coeffs, leaf_key(seed_value, name), threshold, hparams, None, out_rank)
        merged[name], discarded[name] = out[:2], out[2]
        paths[name] = "dense"


__all__ = ["LoraWeight", "MergedAdapter", "adapter_method_problem", "merge_adapters"]
