"""How a merge method declares itself: its parameters once, its per-layer rules, its facts.

As mergekit's methods each declare their parameters in one place and optax's `inject_hyperparams`
turns numbers into state, a drm_jax method is a `MethodSpec`:

- `params`: every parameter once (`Param`): name, kind and range, default (and mergekit's default where
  the command line follows mergekit), whether it may be given per model, whether it is traced (a value
  the compiled programs take as input: changing it never compiles again) or static (structure: the
  programs depend on it), its mergekit name. Config validation, `drm_jax.merge` / `drm_jax.prepare`, the
  command line and `drm-jax methods` all read this; nothing else lists parameters.
- `build(static) -> Rules`: the per-layer functions for the static parameters, built from `drm_jax.math`
  stages. `Rules.linear` merges the 2-D weights selected for the method's linear path (DRM's joint space),
  `Rules.other` every other floating leaf. Each `LayerRule` has a `prepare(deltas)` (the work that does
  not depend on the traced numbers: task vectors, joint decompositions) and a `merge(prepared, ctx)` that
  is pure and traced in every number; the engine vmaps both over stacked layers.

The method reference (equations, defaults, papers) is docs/methods.md.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from drm_jax.errors import MergeInputError, quote
from drm_jax.math.arrays import is_traced
from drm_jax.math.state import MergeTransform, init_state, merged_of
from drm_jax.numbers import is_finite_number

Kind = Literal["fraction", "float", "nonnegative", "rtol", "bool", "choice", "seed", "count"]
_NUMERIC = ("fraction", "float", "nonnegative", "rtol", "seed", "count")


@dataclass(frozen=True)
class Param:
    """One parameter of a method, declared once.

    name: the Python keyword (`drm_jax.merge(..., name=value)`), also accepted in YAML configs.
    kind: "fraction" (a number in [0, 1]), "float" (finite), "nonnegative", "rtol" (in [0, 1)),
      "bool", "choice" (one of `choices`), "seed" (an integer in [0, 2**31)), "count" (an integer in
      [0, 2**31), e.g. an iteration limit; traced counts are int32 inputs).
    default: the Python API's default; None means "off" where `optional`.
    doc: one line for `drm-jax methods` and the docs.
    traced: True where the value is an input of the compiled programs (a sweep does not recompile);
      False where it is structure (the method's stages depend on it).
    per_model: the value may also be a list with one entry per model (YAML: `models[i].parameters`).
    aliases: other names accepted for it (mergekit's name first, if it differs), each mapped by `to_self`.
    mergekit_default: the command line's default where it follows mergekit and differs from `default`.
    optional: None is a valid value (the stage it controls is left out: structure).
    required: mergekit has no default for it: a YAML config must give it (for a per-model parameter, every
      merged model, or the shared `parameters`); the Python API uses `default`.
    """

    name: str
    kind: Kind
    default: Any
    doc: str
    traced: bool = False
    per_model: bool = False
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    mergekit_default: Any = None
    optional: bool = False
    required: bool = False
    # alias -> function turning the alias's value into this parameter's (density -> drop_rate: 1 - x)
    alias_maps: tuple[tuple[str, Callable[[float], float]], ...] = ()

    def check(self, value: Any, where: str) -> Any:
        """The value, checked (and made a float / bool / str); raises ValueError naming `where`."""
        if value is None and self.optional:
            return None
        if self.per_model and isinstance(value, (list, tuple)):
            return tuple(self.check(v, f"{where}[{i}]") for i, v in enumerate(value))
        if self.per_model and getattr(value, "ndim", 0) >= 1:
            return value  # an array of per-model (or per-model, per-layer) values: its consumer checks it
        return check_value(self, value, where)

    def describe(self) -> str:
        if self.kind == "choice":
            return " | ".join(self.choices)
        return {"fraction": "number in [0, 1]", "float": "finite number", "nonnegative": "number >= 0",
                "rtol": "number in [0, 1)", "bool": "true | false", "seed": "integer >= 0",
                "count": "integer >= 0"}[self.kind]


def check_value(param: Param, value: Any, where: str) -> Any:
    kind = param.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false, got {quote(value)}")
        return value
    if kind == "choice":
        if value not in param.choices:
            raise ValueError(f"{where}: must be one of {list(param.choices)}, got {quote(value)}")
        return value
    if kind == "count":
        if is_traced(value):
            return value
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value < 2**31:
            raise ValueError(f"{where}: must be an integer in [0, 2**31), got {quote(value)}")
        return int(value)
    if kind == "seed":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
            raise ValueError(f"{where}: must be an integer in [0, 2**31), got {quote(value)}")
        return value
    if is_traced(value):
        return value  # a traced value inside the caller's own jit: checked by nobody, used as is
    if not is_finite_number(value):
        raise ValueError(f"{where}: must be a finite number, got {quote(value)}")
    value = value if isinstance(value, Complement) else float(value)
    if kind == "fraction" and not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: must be in [0, 1], got {value}")
    if kind == "rtol" and not 0.0 <= value < 1.0:
        raise ValueError(f"{where}: must be in [0, 1), got {value}")
    if kind == "nonnegative" and value < 0:
        raise ValueError(f"{where}: must be >= 0, got {value}")
    return value


class LayerContext(NamedTuple):
    """What a layer's merge receives besides its prepared state (all arrays; vmapped per layer).

    coefficients: (K,) lambda_t of this layer. key: PRNG key of this leaf. threshold: (K,) whole-model
    magnitude thresholds (TIES' model-scope trim) or None. hparams: the method's numbers shared by the
    layers of a group (`MethodSpec.layer_hparams`: a NamedTuple the method declares, or a dict). base: the base model's
    weights of this layer, (out, in) orientation and the compute dtype, for the methods that work on
    weights rather than task vectors (slerp, model stock, ...): the model weights are base + delta_t.
    row0: where the rows of this call start in their leaf: 0 for a whole leaf; a leaf larger than the
    memory budget is merged in row blocks (`RowBlocks`), and random draws are keyed per row of the leaf
    (`drm_jax.math.sparsify.row_uniform`), so a block draws what its rows draw in the whole leaf.
    stats: None for a whole leaf; for a row block, the statistics of the whole leaf its rule's
    `RowBlocks` computed (summed over the blocks, then finished), which the merge reads instead of
    computing them from the block.
    """

    coefficients: Any
    key: Any
    threshold: Any
    hparams: dict
    base: Any = None
    row0: Any = 0
    stats: Any = None


class RowBlocks(NamedTuple):
    """How a rule whose merge is not elementwise still merges a leaf in row blocks (axis 0 of the leaf in
    (out, in) orientation) with the result of the whole leaf: its draws are keyed per row (`LayerContext.row0`)
    and whatever it reads of the whole leaf is a statistic summed over the blocks first.

    stats: (deltas of a block (K, rows, ...), LayerContext) -> a pytree of arrays whose sum over the blocks
      is the statistic of the whole leaf (mergekit's L1 norms for DARE and DELLA, the Gram matrix for
      karcher); None: the merge reads nothing of the whole leaf.
    finish: (the summed statistics as float64 NumPy, the leaf's hparams) -> what the merge of each block
      reads in `LayerContext.stats` (computed on the host); None: the sums themselves.
    x64: compute `stats` in float64 (the sums of a Gram matrix).
    """

    stats: Callable[[Any, LayerContext], Any] | None = None
    finish: Callable[[Any, Any], Any] | None = None
    x64: bool = False


class LayerRule(NamedTuple):
    """One role's per-layer functions (the engine vmaps them over a stacked group).

    prepare: deltas (K, ...) -> prepared state (a pytree of arrays); None keeps the deltas themselves.
    merge: (prepared, LayerContext) -> merged delta (...). Pure; traced in every number.
    shrink: optional, the prepared states of a whole group (stacked on a leading layer axis) -> the same
      truncated to the rows that matter (DRM's rank buckets: one row count for the group, chosen on the
      host outside the vmap, so the vmapped program stays batched over layers).
    x64: run `prepare` in float64 (its outputs are cast back: the merge stays float32).
    rows: how a leaf too large for the memory budget is merged in row blocks (`RowBlocks`), for a rule
      that prepares nothing; None: such a leaf is merged whole (the rules that are elementwise are cut
      into blocks by the command line's reader instead, `Rules.row_separable`).
    """

    prepare: Callable[[Any], Any] | None
    merge: Callable[[Any, LayerContext], Any]
    shrink: Callable[[Any], Any] | None = None
    x64: bool = False
    rows: RowBlocks | None = None


class Rules(NamedTuple):
    """The per-layer rules of a method for one choice of static parameters.

    linear: 2-D weights on the method's linear path (DRM's joint space); other: every other leaf.
    linear_only_2d: whether `linear` needs (K, n, m) deltas (the engine then routes 2-D weights there).
    whole_model_trim_param: the name of the traced parameter that sets per-task thresholds over the whole
      task vector (TIES' model-scope trim), else None.
    row_separable: roles whose merge is elementwise (row blocks of a tensor merge to the same result).
    linear_combination: the merge is a linear combination of the inputs (a non-finite input always
      makes a non-finite output, so the engine checks the outputs only).
    shift_equivariant: merging W + delta_t gives W + the merge of the delta_t for any W (a weighted mean:
      weights that sum to one), so a merge of whole weights over a zero base (the command line's `linear`)
      equals the merge of task vectors over any base (what `--adapter-out` computes).
    scaled_by: the traced parameter both rules multiply the merged delta by as their last stage (the
      engine may then keep the unscaled delta across a sweep of that parameter alone), else None.
    factored: the `linear` rule's merge of LoRA deltas from their factors (`drm_jax.merge_adapters`),
      for the methods whose merge of low-rank deltas is low-rank and computable in the factors' joint
      bases; None: the adapters' deltas are formed one layer at a time.
    """

    linear: LayerRule
    other: LayerRule
    whole_model_trim_param: str | None = None
    row_separable: frozenset[str] = frozenset()
    linear_combination: bool = False
    scaled_by: str | None = None
    factored: "FactoredRule | None" = None
    shift_equivariant: bool = False


class FactoredRule(NamedTuple):
    """A layer's merge of K LoRA deltas s_t B_t A_t (K, n, m) from the factors, never forming an (n, m)
    delta (docs/methods.md#lora-factored). The engine vmaps nothing here: one call per layer.

    prepare: (b (K, n, r), a (K, r, m), scales (K,)) -> prepared state (a pytree of arrays): the work that
      does not depend on the traced numbers (the joint decomposition of the factored stack).
    merge: (prepared, LayerContext) -> (left (n, q), right (q, m)), the merged delta being left @ right
      (the `linear` rule's result exactly, q <= K r); LayerContext.base is None. Traced in every number.
    x64: run `prepare` in float64 (as `LayerRule.x64`).
    """

    prepare: Callable[[Any, Any, Any], Any]
    merge: Callable[[Any, LayerContext], tuple[Any, Any]]
    x64: bool = False


class LeafData(NamedTuple):
    """Per-leaf data a method reads besides the weights (RegMean's Gram matrices): not a number, so not a
    `Param`. Given as a keyword holding one dict per model, {leaf name: array}, for leaves of the linear role.

    name: the keyword (`drm_jax.merge(..., grams=[...])`). doc: one line for `drm-jax methods`.
    shape: a linear leaf's canonical (out, in) shape -> the shape of one model's array for it.
    missing: that shape -> one model's array for a linear leaf the dicts do not name (RegMean: the
      identity, under which its solve is the mean).
    """

    name: str
    doc: str
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    missing: Callable[[tuple[int, ...]], Any]


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: parameters, facts and how to build its rules.

    name: the registry name (`method="..."`, YAML `merge_method`).
    summary: one line. paper: "Authors, title, arXiv id" (empty for weight averaging).
    params: every parameter (`Param`), in display order.
    needs_base: merges task vectors over a base model (mergekit: BasePolicy.REQUIRED).
    base: what the command line does with `base_model` (mergekit's base policy): "required" (the base is
      the reference the K models are merged over; needs_base), "optional" (the reference if given, else
      the models' own weights are merged, over a zero base: nuslerp, multislerp), "input" (not special:
      a given base_model is one more input, all merged over a zero base: linear, karcher, passthrough).
      Default: "required" where needs_base, else "input". The Python API always takes a base tree.
    min_models, max_models: how many models K the method merges (besides a "required" or "optional"
      base; for "input" methods a base_model given on the command line counts as one); None: no limit.
    elementwise: every entry of the output depends only on the same entry of the inputs.
    random: draws random numbers (seeded per tensor by `seed`).
    build: static parameters (a dict of name -> value for every non-traced parameter) -> `Rules`.
    layer_hparams: (traced values dict, role, canonical shape, K, static) -> the group's numbers: a
      NamedTuple the method declares (`DrmNumbers`, ...: its traced parameters and what the hooks beside
      the stages derive, exact integer counts on the host where values are concrete), or a dict of arrays
      (the methods not yet typed).
    reference: the anchor of the method in docs/methods.md.
    reads_base: the merge reads the base weights (`LayerContext.base`: slerp, karcher, arcee_fusion,
      passthrough): the merged model is not base + a function of the task vectors alone, so no merge of
      LoRA adapters (`drm_jax.merge_adapters`, `--adapter-out`) computes it from the adapters.
    leaf_data: per-leaf data the linear rule reads (`LeafData`): its merge then receives
      (prepared, data), data a tuple with one (K, ...) array per entry, stacked with the layers.
    """

    name: str
    summary: str
    paper: str
    params: tuple[Param, ...]
    needs_base: bool
    elementwise: bool
    random: bool
    build: Callable[[dict], Rules]
    layer_hparams: Callable[..., dict]
    reference: str = ""
    mergekit: bool = False  # the command line gives mergekit's meaning to its parameters
    # static parameters the engine supplies, not the caller (`ROUND_TO`, from `compute_dtype`): `build`
    # receives each of them (None where unset); they are not keywords of the entry points
    engine_params: tuple[Param, ...] = ()
    base: str = ""
    min_models: int = 1
    max_models: int | None = None
    reads_base: bool = False
    leaf_data: tuple[LeafData, ...] = ()
    _by_name: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        for p in self.params:
            self._by_name[p.name] = p
        if not self.base:
            object.__setattr__(self, "base", "required" if self.needs_base else "input")
        if self.base not in ("required", "optional", "input") or (self.base == "required") != self.needs_base:
            raise ValueError(f"method {self.name!r}: base {self.base!r} does not fit needs_base={self.needs_base}")

    def count_problem(self, k: int) -> str | None:
        """Why K models do not fit the method (mergekit's input contract), or None."""
        lo, hi = self.min_models, self.max_models
        if lo <= k and (hi is None or k <= hi):
            return None
        want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None or k < lo else f"at most {hi}")
        besides = {"required": " besides the base model", "optional": " besides the base model, if any",
                   "input": " (a base_model counts as one)"}[self.base]
        return f"method {self.name!r} merges {want} model{'s' if hi != 1 else ''}{besides}, got {k}"

    def param(self, name: str) -> Param:
        return self._by_name[name]

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the method accepts: parameters and their aliases."""
        return tuple(n for p in self.params for n in (p.name,) + p.aliases)

    @property
    def traced(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.traced)

    @property
    def static(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.traced)

    def canonical(self, given: dict, where: Callable[[str], str] = str) -> dict:
        """Aliases mapped to parameter names and values checked; unknown names raise ValueError."""
        out: dict[str, Any] = {}
        given_as: dict[str, str] = {}  # parameter name -> the name it was given under
        owners = {a: p for p in self.params for a in p.aliases}
        for name, value in given.items():
            if name in self._by_name:
                p, key = self._by_name[name], name
                value = p.check(value, where(name))
            elif name in owners:
                p, key = owners[name], owners[name].name
                value = p.check(value, where(name)) if not dict(p.alias_maps).get(name) else \
                    _mapped(p, name, value, where(name))
            else:
                raise UnknownParameter(name, self)
            if key in out:
                raise ValueError(_given_twice(p, given_as[key], name, where))
            out[key] = value
            given_as[key] = name
        return out

    def with_defaults(self, values: dict) -> dict:
        return {p.name: values.get(p.name, p.default) for p in self.params}

    def __repr__(self) -> str:
        return f"MethodSpec({self.name!r})"

    def __call__(self, **params: Any) -> "MethodSpec":
        """This method with some parameters bound: `drm_jax.drm(direction="vertical", drop_rate=0.7)` is DRM
        whose defaults are those values (checked here; aliases converted where the method reads them).
        The bound method has the same rules, so it shares every compiled program with the method."""
        try:
            values = self.canonical(params)
        except ValueError as err:
            message = str(err) if isinstance(err, UnknownParameter) else f"method {self.name!r}: {err}"
            raise MergeInputError(message) from None
        bound = tuple(replace(p, default=values[p.name]) if p.name in values else p for p in self.params)
        return replace(self, params=bound, _by_name={})


def _given_twice(p: Param, first: str, second: str, where: Callable[[str], str]) -> str:
    """Two names of one parameter given together (density and drop_rate): say that they are one."""
    a, b = sorted((first, second))
    maps = dict(p.alias_maps)
    relation = f" ({a} = 1 - {b})" if one_minus in (maps.get(a), maps.get(b)) else ""
    context = where(second)
    prefix = "" if context == second else f"{context.removesuffix(second).rstrip('.')}: "
    return f"{prefix}{a} and {b} are the same parameter{relation}; give one"


def _mapped(p: Param, alias: str, value: Any, where: str):
    fn = dict(p.alias_maps)[alias]
    if isinstance(value, (list, tuple)) and p.per_model:
        return tuple(_mapped(p, alias, v, f"{where}[{i}]") for i, v in enumerate(value))
    checked = check_value(Param(alias, p.kind, None, ""), value, where)
    return fn(checked)


class UnknownParameter(ValueError):
    def __init__(self, name: str, spec: MethodSpec):
        self.name = name
        super().__init__(f"unknown parameter {name!r} for method {spec.name!r}; accepted: {sorted(spec.names)}")


class Complement(float):
    """1 - x that remembers x: an alias given as its complement (`density` for a drop rate) converts back to
    exactly the number given (float64's 1 - (1 - 0.3) is 0.30000000000000004, one pruned entry apart at
    N = 15)."""

    def __new__(cls, of: float):
        self = super().__new__(cls, 1.0 - of)
        self.of = of
        return self


def one_minus(x: float) -> float:
    """density -> drop rate (and back): the one place `drop_rate = 1 - density` is written. The complement
    of a `Complement` is the number it was made from, exactly."""
    if isinstance(x, Complement):
        return x.of
    if isinstance(x, (list, tuple)):
        return type(x)(one_minus(v) for v in x)
    if getattr(x, "ndim", 0) or is_traced(x):
        return 1.0 - x
    return Complement(float(x))


def per_model_values(value: Any, k: int, name: str) -> Sequence[Any]:
    """A scalar broadcast to K models, or a per-model list checked for length K."""
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ValueError(f"{name}: {len(value)} values given for {k} models")
        return list(value)
    return [value] * k


def per_model_numbers(value: Any, k: int, name: str):
    """`per_model_values` as K numbers (a (K,) array also accepted): float64 numpy where concrete (host-side
    counts), a float32 JAX array where traced (a merge inside the caller's jit)."""
    if is_traced(value):
        if isinstance(value, (list, tuple)):
            value = jnp.stack([jnp.asarray(v, jnp.float32) for v in value])
        return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (k,))
    if getattr(value, "ndim", 0) >= 1:
        value = np.asarray(value, np.float64)
        if value.shape != (k,):
            raise ValueError(f"{name}: {value.shape} values given for {k} models")
        return value
    return np.asarray(per_model_values(value, k, name), np.float64)




# -- pieces every method module uses -------------------------------------------------------------------
COEFFICIENTS = Param("coefficients", "float", 1.0, "per-model coefficient lambda_t (the weights of an average)",
                     traced=True, per_model=True, aliases=("weight",))
LAMBDA = Param("lambda_", "float", 1.0, "global scaling of the merged delta", traced=True,
               aliases=("lambda", "scaling"))
ROUND_TO = Param("round_to", "choice", None, "mergekit's float16 / bfloat16 `dtype`: the stages round where "
                 "mergekit's arithmetic in that dtype rounds (set by compute_dtype; docs/methods.md#compute-dtype)",
                 choices=("float16", "bfloat16"), optional=True)
SEED = Param("seed", "seed", 0, "seed of the random draws (each tensor's key folds in its name)")
INT8_MASK = Param("int8_mask", "bool", False, "mergekit's memory option for its masks; accepted for mergekit "
                  "configs, no effect on the result (masks here are boolean)")


def _state(deltas, ctx: LayerContext):
    return init_state(deltas, ctx.coefficients, ctx.key, ctx.threshold, ctx.hparams, row0=ctx.row0, stats=ctx.stats)


def chain_rule(transform: MergeTransform, rows_after: MergeTransform | None = None) -> LayerRule:
    """A rule that prepares nothing (the deltas themselves) and merges with one chain of stages.

    rows_after: the chain's first stage, where it is the only one that reads more of a leaf than a row
    of it (DARE's and DELLA's drops: their draws are keyed per row, their rescaling reads the whole
    leaf's L1 norms, `row_sums`) and every later stage is elementwise: the rule then merges a leaf in
    row blocks (`RowBlocks`) with the whole leaf's result."""
    def merge(deltas, ctx: LayerContext):
        return merged_of(transform(_state(deltas, ctx)))

    rows = None
    if rows_after is not None:
        sums = getattr(rows_after, "row_sums", None)
        rows = RowBlocks(stats=None if sums is None else lambda deltas, ctx: sums(_state(deltas, ctx)))
    return LayerRule(prepare=None, merge=merge, rows=rows)


def traced_numbers(type_name: str, *names: str, counts: tuple[str, ...] = (), derived: tuple[str, ...] = (),
                   derive: Callable | None = None):
    """The `layer_hparams` of a method whose numbers are some of its traced parameters as given: a NamedTuple
    type named `type_name` with exactly those fields (float32 scalars; the ones in `counts` int32), then
    the fields `derived`: what `derive(values, role, shape, k)` returns for them ({name: value}, the host
    hooks of the stages: `math.state.derives`), None where it returns none. The type is the function's
    `numbers_type`."""
    numbers_type = NamedTuple(type_name, [(n, Any) for n in names + derived])

    def layer_hparams(values: dict, role: str, shape, k: int, static: dict):
        extra = derive(values, role, tuple(shape), k) if derive is not None else {}
        return numbers_type(*(jnp.asarray(values[n], jnp.int32) if n in counts else scalar(values[n])
                              for n in names), *(extra.get(n) for n in derived))

    layer_hparams.numbers_type = numbers_type
    return layer_hparams


def scalar(value) -> Any:
    """A traced hyperparameter as a float32 array (a Python number becomes a constant-shaped input)."""
    return jnp.asarray(value, jnp.float32)


__all__ = ["COEFFICIENTS", "Complement", "FactoredRule", "INT8_MASK", "LAMBDA", "LayerContext", "LayerRule", "LeafData",
           "MethodSpec", "Param", "ROUND_TO", "RowBlocks", "Rules", "SEED", "UnknownParameter", "chain_rule", "check_value",
           "one_minus", "per_model_numbers", "per_model_values", "scalar", "traced_numbers"]
