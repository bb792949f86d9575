"""The merge methods compared, their validation search through `drm_jax.prepare`, and learned coefficients.

Only the encoder's trainable part is merged (heads stay per task). Each method is prepared once per seed
(`drm_jax.prepare`: the decompositions and the stacking are done there) and every candidate of its search
is one `Prepared.merge(...)` with new numbers: nothing is decomposed or compiled again. Candidates are
scored by the mean over tasks of the *validation* accuracy normalised by the individually fine-tuned
model's validation accuracy; the test split is only evaluated for the chosen setting.

The search is a coordinate search: a scale (lambda, or alpha for TSV-M / Iso-CTS) by a line search whose
grid is extended past an edge while the best value sits on it and then refined around the best, so the
chosen value always has tried neighbours on both sides; a drop rate or density over a fixed list.

`learn_coefficients` is AdaMerging (Yang et al., arXiv 2310.02575, layer-wise): one coefficient per task
and merged leaf, shape (K, num_layers), learned by gradient descent on the entropy of the merged model's
predictions on unlabeled validation texts, through the differentiable merge
(`jax.vjp` of `Prepared.merge(coefficients=c)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import drm_jax

# evaluate(trainable_params, task_names, part) -> {task: accuracy}
Evaluate = Callable[[Any, Sequence[str], str], dict]


@dataclasses.dataclass(frozen=True)
class Grid:
    """Where the validation search starts (profiles.py sets them).

    Scales (lambda, alpha) are line-searched from these points: extended by one step past an edge while
    the best is on it (at most `max_extend` times; below `lower` the step is halved instead), then refined
    `refine` times by trying the midpoints next to the best. Drop rates and densities are tried as listed.
    """

    ta_lambdas: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)  # task arithmetic's lambda
    disjoint_lambdas: tuple[float, ...] = (0.75, 1.0, 1.25, 1.5)  # lambda of TIES-family (disjoint-mean) merges
    subspace_alphas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)  # alpha of TSV-M / Iso-C / Iso-CTS
    ties_densities: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)  # TIES: fraction kept (drop rates 0.5 to 0.9)
    dare_drop_rates: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9)
    drop_rates: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97)  # DRM / KnOTS
    default_drop_rate: float = 0.8  # DRM-family methods whose drop rate is not swept
    sweep: tuple[str, ...] = ("DRM-H",)  # labels whose drop rate is searched over `drop_rates`
    sweep_test: tuple[str, ...] = ("DRM-H",)  # of those, the ones whose sweep is also evaluated on test
    refine: int = 1
    max_extend: int = 6
    lower: float = 0.0  # scales stay above this


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """label: row name; method: registered drm_jax method; fixed: static parameters given to prepare."""

    label: str
    method: str
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)


METHODS = (
    MethodSpec("Linear average", "linear"),
    MethodSpec("Task arithmetic", "task_arithmetic"),
    MethodSpec("TIES", "ties"),
    MethodSpec("DARE-TIES", "dare_ties", {"seed": 0}),
    MethodSpec("KnOTS-TIES", "knots_ties"),
    MethodSpec("DRM-H", "drm", {"direction": "horizontal"}),
    MethodSpec("DRM-V", "drm", {"direction": "vertical"}),
    MethodSpec("TSV-M", "tsv_m"),
    MethodSpec("Iso-CTS", "iso_cts"),
)
SUBSPACE_METHODS = ("tsv_m", "iso_c", "iso_cts")  # one global alpha, passed as "lambda" (an alias of alpha)
DRM_FAMILY = ("drm", "knots_ties")
METHOD_LABELS = tuple(m.label for m in METHODS)

# AdaMerging rows: (label, the method whose prepared merge is learned through)
ADAMERGING = (("AdaMerging (task arithmetic)", "Task arithmetic"), ("AdaMerging (DRM-H)", "DRM-H"))
ADAMERGING_LABELS = tuple(label for label, _ in ADAMERGING)


def spec_by_label(label: str) -> MethodSpec:
    return next(m for m in METHODS if m.label == label)


def merge_kwargs(spec: MethodSpec, params: Mapping[str, Any]) -> dict:
    """Prepared.merge keyword arguments of one search point: 'lambda' is the method's global scale."""
    kwargs = dict(params)
    lam = kwargs.pop("lambda", None)
    if lam is not None:
        kwargs["lambda_"] = lam
    return kwargs


def prepare_method(base, finetuned: Sequence, spec: MethodSpec):
    """drm_jax.prepare of Flax trees (kernels (in, out) -> layout='flax'), the method's static parameters."""
    return drm_jax.prepare(base, list(finetuned), method=spec.method, layout="flax", **spec.fixed)


def merge_encoders(base, finetuned: Sequence, spec: MethodSpec, params: Mapping[str, Any]):
    """One merge without a prepared plan (drm_jax.merge), numpy leaves out."""
    merged = drm_jax.merge(base, list(finetuned), method=spec.method, layout="flax", **spec.fixed,
                           **merge_kwargs(spec, params))
    return jax.tree.map(np.asarray, merged)


# ------------------------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Stage:
    """kind 'grid': try `values` of `param`; kind 'line': line-search the scale `param` from `values`
    (None: around the current choice, one step of the last line search either side)."""

    kind: str
    param: str
    values: tuple[float, ...] | None


def search_plan(spec: MethodSpec, grid: Grid) -> tuple[dict, list[Stage]]:
    """(starting parameters, stages) of a method's coordinate search on validation.

    Task arithmetic, TSV-M, Iso-CTS: their scale. TIES / DARE-TIES: density / drop rate (at lambda 1),
    then lambda. DRM / KnOTS: lambda at the default drop rate; for the swept labels then the drop rate at
    that lambda and lambda again around its choice at the new drop rate.
    """
    m = spec.method
    if m == "linear":
        return {}, []
    one = {"lambda": 1.0}  # the scale of the stages before its own (every candidate names its lambda)
    if m == "task_arithmetic":
        return one, [Stage("line", "lambda", grid.ta_lambdas)]
    if m in SUBSPACE_METHODS:
        return one, [Stage("line", "lambda", grid.subspace_alphas)]
    if m == "ties":
        return one, [Stage("grid", "density", grid.ties_densities), Stage("line", "lambda", grid.disjoint_lambdas)]
    if m in ("dare_ties", "dare_linear"):
        return one, [Stage("grid", "drop_rate", grid.dare_drop_rates), Stage("line", "lambda", grid.disjoint_lambdas)]
    if m in DRM_FAMILY:
        stages = [Stage("line", "lambda", grid.disjoint_lambdas)]
        if spec.label in grid.sweep:
            stages += [Stage("grid", "drop_rate", grid.drop_rates), Stage("line", "lambda", None)]
        return {"drop_rate": grid.default_drop_rate, **one}, stages
    return one, [Stage("line", "lambda", grid.disjoint_lambdas)]


def _key(params: Mapping) -> tuple:
    return tuple(sorted((k, round(v, 6) if isinstance(v, float) else v) for k, v in params.items()))


def line_search(score: Callable[[float], float], start: Sequence[float], *, refine: int = 1, max_extend: int = 6,
                lower: float = 0.0, step: float | None = None) -> tuple[float, float, bool]:
    """Maximise score(v) over a scale v > lower: (best, last step, whether the best is still at an edge).

    Every value in `start` is tried; while the best is the largest (smallest) value tried, one step more
    (less) is tried, at most `max_extend` times (a step that would reach `lower` halves the distance to it
    instead); then `refine` times the step is halved and the two values next to the best are tried. Ties
    keep the value tried first. `score` may be called again for a value (callers cache).
    """
    tried: dict[float, float] = {}
    order: list[float] = []

    def trial(v: float) -> None:
        v = round(float(v), 6)
        if v not in tried:
            tried[v] = score(v)
            order.append(v)

    def best() -> float:
        return max(order, key=lambda v: (tried[v], -order.index(v)))

    values = sorted({round(float(v), 6) for v in start})
    if step is None:
        step = float(np.min(np.diff(values))) if len(values) > 1 else max(abs(values[0]) / 2, 0.1)
    for v in values:
        trial(v)
    for _ in range(max_extend):
        b, ordered = best(), sorted(tried)
        if len(ordered) > 1 and ordered[0] < b < ordered[-1]:
            break
        if b == ordered[-1]:
            trial(b + step)
        if b == ordered[0]:
            below = b - step
            trial(below if below > lower + 1e-9 else (b + lower) / 2)
    for _ in range(refine):
        step /= 2
        b = best()
        for v in (b - step, b + step):
            if v > lower + 1e-9:
                trial(v)
    b, ordered = best(), sorted(tried)
    return b, step, not (ordered[0] < b < ordered[-1])


@dataclasses.dataclass
class Trial:
    params: dict
    val: dict
    score: float
    stage: int = 0  # the index of the search stage that first tried it


@dataclasses.dataclass
class Selection:
    label: str
    chosen: dict
    trials: list[Trial]
    at_edge: bool = False  # a scale whose best stayed at an edge after max_extend extensions
    scale_grid: tuple[float, ...] = ()  # the scale values tried at the chosen other parameters

    @property
    def chosen_val(self) -> dict:
        return next(t.val for t in self.trials if t.params == self.chosen)


def normalized(acc: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """Mean over tasks of acc / reference (the individually fine-tuned accuracy)."""
    return float(np.mean([acc[t] / max(reference[t], 1e-9) for t in acc]))


def select_on_validation(spec: MethodSpec, grid: Grid, validate: Callable[[dict], dict],
                         ft_val: Mapping[str, float], progress: Callable[[str], None] | None = None) -> Selection:
    """Run the method's search plan; validate(params) -> {task: validation accuracy} of that merge.

    Every candidate is validated once (a repeated one is looked up); ties keep the earlier candidate, so
    the outcome does not depend on float noise in later ones.
    """
    start, stages = search_plan(spec, grid)
    seen: dict[tuple, Trial] = {}
    trials: list[Trial] = []
    best: list[Trial] = []
    last_step: float | None = None
    at_edge = False

    def run(params: dict, stage: int) -> Trial:
        key = _key(params)
        if key in seen:
            return seen[key]
        if progress:
            progress(f"{spec.label} {params}")
        val = validate(dict(params))
        trial = Trial(dict(params), val, normalized(val, ft_val), stage)
        seen[key] = trial
        trials.append(trial)
        if not best or trial.score > best[0].score:
            best[:] = [trial]
        return trial

    if not stages:
        run(dict(start), 0)
    for index, stage in enumerate(stages):
        current = dict(best[0].params) if best else dict(start)
        if stage.kind == "grid":
            for v in stage.values:
                run({**current, stage.param: float(v)}, index)
            continue
        if stage.values is None:  # around the current choice, one step of the last line search either side
            centre = float(current.get(stage.param, 1.0))
            step = last_step if last_step is not None else 0.25
            values = tuple(v for v in (centre - step, centre, centre + step) if v > grid.lower + 1e-9)
            step_arg = step
        else:
            values, step_arg = stage.values, None
        _, last_step, at_edge = line_search(lambda v: run({**current, stage.param: v}, index).score, values,
                                            refine=grid.refine, max_extend=grid.max_extend, lower=grid.lower,
                                            step=step_arg)
    chosen = best[0]
    others = {k: v for k, v in chosen.params.items() if k != "lambda"}
    scale_grid = tuple(sorted(t.params["lambda"] for t in trials if "lambda" in t.params
                              and {k: v for k, v in t.params.items() if k != "lambda"} == others))
    return Selection(spec.label, dict(chosen.params), trials, at_edge, scale_grid)


# ------------------------------------------------------------------------------------ learned coefficients
@dataclasses.dataclass(frozen=True)
class AdaConfig:
    """AdaMerging's optimisation: Adam on the coefficients, `steps` steps, each on `batch_per_task`
    unlabeled validation texts of every task (fresh ones each step, cycling).

    relative=True: Adam runs on each coefficient divided by its starting value, so one step moves a
    coefficient by about `learning_rate` times where it started, whatever the method's scale (task
    arithmetic starts near 0.3, DRM near 1), and coefficients are kept >= 0 (AdaMerging's paper clamps
    them to [0, 1]). relative=False: Adam on the coefficients themselves, unbounded (the default
    profile's setting, kept so that its table is unchanged; at the full profile's 16 steps it drove task
    arithmetic's coefficients from 0.3 to -0.17..0.76 and collapsed some tasks)."""

    steps: int = 12
    batch_per_task: int = 8
    learning_rate: float = 0.03
    relative: bool = False


def learn_coefficients(prepared, init, loss_and_grad: Callable[[Any, int], tuple[float, Any]], cfg: AdaConfig,
                       fixed: Mapping[str, Any] | None = None,
                       progress: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[float]]:
    """AdaMerging: coefficients c (K, num_layers) minimising loss(merge(c)) by Adam, from `init`.

    loss_and_grad(merged_tree, step) -> (loss, d loss / d merged_tree) (the entropy of the predictions on
    that step's batch); the gradient reaches c through `jax.vjp` of `prepared.merge(coefficients=c,
    **fixed)`, the method's own derivative (at fixed masks for the masked methods).
    Returns (learned c as numpy, loss per step).
    """
    import optax

    init = jnp.asarray(init, jnp.float32)
    # relative: the variable is r = c / init (a zero start is left on the absolute scale).
    scale = jnp.where(init > 0, init, 1.0) if cfg.relative else jnp.ones_like(init)
    r = init / scale
    fixed = dict(fixed or {})
    optimizer = optax.adam(cfg.learning_rate)
    state = optimizer.init(r)
    losses = []
    for step in range(cfg.steps):
        merged, pullback = jax.vjp(lambda v: prepared.merge(coefficients=v * scale, **fixed), r)
        loss, grad_tree = loss_and_grad(merged, step)
        (grad,) = pullback(grad_tree)
        updates, state = optimizer.update(grad, state, r)
        r = optax.apply_updates(r, updates)
        if cfg.relative:
            r = optax.projections.projection_non_negative(r)
        losses.append(float(loss))
        if progress:
            progress(f"step {step + 1}/{cfg.steps} entropy {losses[-1]:.4f}")
    return np.asarray(r * scale), losses
