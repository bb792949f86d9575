"""The merge methods compared, their validation search through `drm_jax.prepare`, and learned coefficients.

Only the encoder's trainable part is merged (heads stay per task). Each method is prepared once per seed
(`drm_jax.prepare`: the decompositions and the stacking are done there) and every candidate of its search
is one `Prepared.merge(...)` with new numbers: nothing is decomposed or compiled again. Candidates are
scored by the mean over tasks of the *validation* accuracy normalised by the individually fine-tuned
model's validation accuracy; the test split is only evaluated for the chosen setting.

The search is the same for every method with the same number of parameters: a coordinate search in
which every parameter (a scale, lambda or alpha; a drop rate, density or common fraction) is
line-searched from three starting values, extended past an edge while the best value sits on it and
refined around the best, so the chosen value has tried neighbours on both sides (or sits at a natural
bound: drop rate 0, density 1); a method with two parameters then searches each again around its choice
until neither moves. WUDI has no scale and runs at FusionBench's fixed Adam settings (Grid.wudi_*);
RegMean searches its reduce_non_diagonal_ratio like a one-parameter method.

`learn_coefficients` is layer-wise AdaMerging (Yang et al., arXiv 2310.02575) through
`drm_jax.adamerging(..., granularity="layer")`: one coefficient per task and merged leaf, shape
(K, num_layers), learned by gradient descent on the entropy of the merged model's predictions on
unlabeled validation texts, through the differentiable merge.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

import drm_jax

# evaluate(trainable_params, task_names, part) -> {task: accuracy}
Evaluate = Callable[[Any, Sequence[str], str], dict]


@dataclasses.dataclass(frozen=True)
class Grid:
    """Where the validation search starts (profiles.py sets them): three values per searched parameter.

    Every parameter is line-searched from its three values (`line_search`): extended by one step past an
    edge while the best is on it (at most `max_extend` times; a step that would leave the parameter's
    domain goes to its natural bound, or halfway to an open one), then refined `refine` times by the
    midpoints next to the best. A method with two parameters searches its scale, then the other, then,
    for at most `rounds` rounds, each again around its choice until neither moves.
    """

    ta_lambdas: tuple[float, ...] = (0.2, 0.4, 0.6)  # task arithmetic's lambda
    disjoint_lambdas: tuple[float, ...] = (0.75, 1.0, 1.25)  # lambda of TIES / DARE / DRM-family merges
    subspace_alphas: tuple[float, ...] = (0.5, 1.0, 1.5)  # alpha of TSV-M / Iso-C / Iso-CTS
    densities: tuple[float, ...] = (0.1, 0.5, 0.9)  # TIES: fraction kept
    drop_rates: tuple[float, ...] = (0.1, 0.5, 0.9)  # DRM, KnOTS-TIES, DARE-TIES
    common_fractions: tuple[float, ...] = (0.65, 0.8, 0.95)  # Iso-CTS (0.8: the paper's)
    regmean_ratios: tuple[float, ...] = (0.55, 0.75, 0.95)  # RegMean's reduce_non_diagonal_ratio (0.95: FusionBench's)
    wudi_iter_num: int = 400  # WUDI's Adam steps, fixed (FusionBench's config; WUDI has no scale to search)
    wudi_learning_rate: float = 1e-5  # WUDI's Adam step size, fixed (FusionBench's)
    sweep_test: tuple[str, ...] = ("DRM-H",)  # labels whose drop-rate stage is also evaluated on test
    refine: int = 1
    max_extend: int = 6
    rounds: int = 2


@dataclasses.dataclass(frozen=True)
class Axis:
    """One searched parameter: its starting values and its domain. `low` / `high` bound it (None: no
    bound); a bound marked natural is a value the parameter may take and where the search may stop
    (drop rate 0: nothing dropped; density 1: everything kept); an open bound is approached by halving."""

    param: str
    start: tuple[float, ...]
    low: float | None = 0.0
    high: float | None = None
    low_natural: bool = False
    high_natural: bool = False

    def inside(self, v: float) -> bool:
        ok_low = self.low is None or v > self.low + 1e-9 or (self.low_natural and abs(v - self.low) <= 1e-9)
        ok_high = self.high is None or v < self.high - 1e-9 or (self.high_natural and abs(v - self.high) <= 1e-9)
        return ok_low and ok_high

    def at_natural_bound(self, v: float) -> bool:
        return ((self.low_natural and abs(v - self.low) <= 1e-9)
                or (self.high_natural and abs(v - self.high) <= 1e-9))

    def beyond(self, v: float, step: float, direction: int) -> float | None:
        """The next value past v (direction +1 up, -1 down): v +- step, or where that leaves the domain the
        natural bound itself, or halfway to an open bound; None where v already is the natural bound."""
        bound, natural = (self.high, self.high_natural) if direction > 0 else (self.low, self.low_natural)
        if bound is not None and abs(v - bound) <= 1e-9:
            return None
        nxt = v + direction * step
        if bound is None or (bound - nxt) * direction > 1e-9:
            return nxt
        return bound if natural else (v + bound) / 2


def scale_axis(param: str, start: Sequence[float]) -> Axis:
    """A global scale (lambda, alpha): above 0, unbounded."""
    return Axis(param, tuple(start), low=0.0)


def drop_rate_axis(start: Sequence[float]) -> Axis:
    return Axis("drop_rate", tuple(start), low=0.0, high=1.0, low_natural=True)


def density_axis(start: Sequence[float]) -> Axis:
    return Axis("density", tuple(start), low=0.0, high=1.0, high_natural=True)


def ratio_axis(start: Sequence[float]) -> Axis:
    """RegMean's reduce_non_diagonal_ratio in [0, 1]: 1 is least squares on the Gram matrices, 0 keeps only
    their diagonals; both ends are values it may take."""
    return Axis("reduce_non_diagonal_ratio", tuple(start), low=0.0, high=1.0, low_natural=True, high_natural=True)


def common_fraction_axis(start: Sequence[float]) -> Axis:
    """Iso-CTS's common fraction f in [0, 1] (f = 1 is Iso-C): both ends are values it may take."""
    return Axis("common_fraction", tuple(start), low=0.0, high=1.0, low_natural=True, high_natural=True)


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
    MethodSpec("WUDI", "wudi"),
    MethodSpec("RegMean", "regmean"),
)
SUBSPACE_METHODS = ("tsv_m", "iso_c", "iso_cts")  # one global alpha, passed as "lambda" (an alias of alpha)
DRM_FAMILY = ("drm", "knots_ties")
METHOD_LABELS = tuple(m.label for m in METHODS)

# AdaMerging rows: (label, the method whose prepared merge is learned through)
ADAMERGING = (("AdaMerging (task arithmetic)", "Task arithmetic"), ("AdaMerging (DRM-H)", "DRM-H"))
ADAMERGING_LABELS = tuple(label for label, _ in ADAMERGING)


def spec_by_label(label: str) -> MethodSpec:
    return next(m for m in METHODS if m.label == label)


SCALES = ("lambda", "alpha")  # the global scale's name: "alpha" for the subspace methods
STATIC = {"iso_cts": ("common_fraction",)}  # parameters that set shapes: given to prepare, not to merge


def scale_of(params: Mapping[str, Any]) -> float | None:
    """The global scale of a search point (lambda, or alpha for the subspace methods), None if it has none."""
    return next((float(params[k]) for k in SCALES if k in params), None)


def merge_kwargs(spec: MethodSpec, params: Mapping[str, Any]) -> dict:
    """Prepared.merge keyword arguments of one search point: 'lambda' / 'alpha' is the method's global
    scale, passed as lambda_ (an alias of alpha for TSV-M / Iso-CTS)."""
    kwargs = dict(params)
    for name in SCALES:
        lam = kwargs.pop(name, None)
        if lam is not None:
            kwargs["lambda_"] = lam
    return kwargs


def split_static(spec: MethodSpec, kwargs: Mapping[str, Any]) -> tuple[dict, dict]:
    """(static, traced) keyword arguments: the static ones go to drm_jax.prepare."""
    names = STATIC.get(spec.method, ())
    return ({k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names})


def prepare_method(base, finetuned: Sequence, spec: MethodSpec, data: Mapping[str, Any] | None = None):
    """drm_jax.prepare of Flax trees (kernels (in, out) -> layout='flax'), the method's static parameters;
    data: the method's per-leaf data (RegMean: {"grams": one dict per model})."""
    return drm_jax.prepare(base, list(finetuned), method=spec.method, layout="flax", **spec.fixed, **(data or {}))


def merge_encoders(base, finetuned: Sequence, spec: MethodSpec, params: Mapping[str, Any],
                   data: Mapping[str, Any] | None = None):
    """One merge without a prepared plan (drm_jax.merge), numpy leaves out."""
    merged = drm_jax.merge(base, list(finetuned), method=spec.method, layout="flax", **spec.fixed, **(data or {}),
                           **merge_kwargs(spec, params))
    return jax.tree.map(np.asarray, merged)


# ------------------------------------------------------------------------------------------- the plan
def search_plan(spec: MethodSpec, grid: Grid) -> tuple[dict, list[Axis]]:
    """(starting parameters, searched axes in order) of a method's coordinate search on validation.

    None searched: the linear average; WUDI, whose Adam settings are fixed (Grid.wudi_*). One parameter:
    task arithmetic (lambda), TSV-M and Iso-C (alpha), RegMean (reduce_non_diagonal_ratio). Two: TIES (lambda, density),
    DARE-TIES (lambda, drop rate), DRM-H / DRM-V / KnOTS-TIES (lambda, drop rate), Iso-CTS (alpha,
    common fraction). The scale is searched first, at the middle starting value of the other parameter.
    """
    m = spec.method
    if m == "linear":
        return {}, []
    if m == "wudi":  # no scale: its Adam settings are fixed (FusionBench's), shown as the chosen numbers
        return {"iter_num": int(grid.wudi_iter_num), "learning_rate": float(grid.wudi_learning_rate)}, []
    if m == "regmean":
        return {"reduce_non_diagonal_ratio": float(sorted(grid.regmean_ratios)[len(grid.regmean_ratios) // 2])}, [
            ratio_axis(grid.regmean_ratios)]
    if m == "task_arithmetic":
        axes = [scale_axis("lambda", grid.ta_lambdas)]
    elif m in SUBSPACE_METHODS:
        axes = [scale_axis("alpha", grid.subspace_alphas)]
        if m == "iso_cts":
            axes.append(common_fraction_axis(grid.common_fractions))
    elif m == "ties":
        axes = [scale_axis("lambda", grid.disjoint_lambdas), density_axis(grid.densities)]
    else:  # DARE, the DRM family and any other method with a drop rate
        axes = [scale_axis("lambda", grid.disjoint_lambdas), drop_rate_axis(grid.drop_rates)]
    start = {a.param: (1.0 if a.param in SCALES else float(sorted(a.start)[len(a.start) // 2])) for a in axes}
    return start, axes


def _key(params: Mapping) -> tuple:
    return tuple(sorted((k, round(v, 6) if isinstance(v, float) else v) for k, v in params.items()))


def line_search(score: Callable[[float], float], axis: Axis, start: Sequence[float] | None = None, *,
                refine: int = 1, max_extend: int = 6, step: float | None = None) -> tuple[float, float, bool]:
    """Maximise score(v) over the axis' domain: (best, last step, whether the best is still at an edge).

    Every value in `start` (default: the axis' starting values) is tried; while the best is the largest
    (smallest) value tried, one step more (less) is tried (`Axis.beyond`), at most `max_extend` times; then
    `refine` times the step is halved and the two values next to the best are tried. A best at a natural
    bound is not at an edge. Ties keep the value tried first. `score` may be called again (callers cache).
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

    values = sorted({round(float(v), 6) for v in (axis.start if start is None else start) if axis.inside(v)})
    if step is None:
        step = float(np.min(np.diff(values))) if len(values) > 1 else max(abs(values[0]) / 2, 0.1)
    for v in values:
        trial(v)
    for _ in range(max_extend):
        b, ordered = best(), sorted(tried)
        moves = [axis.beyond(b, step, d) for d, end in ((1, ordered[-1]), (-1, ordered[0])) if b == end]
        moves = [v for v in moves if v is not None and round(v, 6) not in tried]
        if not moves:
            break
        for v in moves:
            trial(v)
    for _ in range(refine):
        step /= 2
        b = best()
        for v in (b - step, b + step):
            if axis.inside(v):
                trial(v)
    b, ordered = best(), sorted(tried)
    return b, step, at_edge(axis, b, ordered)


def at_edge(axis: Axis, chosen: float, tried: Sequence[float]) -> bool:
    """Whether `chosen` is the smallest or largest value tried (and not at a natural bound)."""
    low, high = min(tried), max(tried)
    return not axis.at_natural_bound(chosen) and not (low < chosen < high)


@dataclasses.dataclass
class Trial:
    params: dict
    val: dict
    score: float
    stage: int = 0  # the index of the search stage that first tried it (Selection.stages names its axis)
    refused: str | None = None  # the library's one-line refusal where the merge was refused (score -inf)


@dataclasses.dataclass
class Selection:
    label: str
    chosen: dict
    trials: list[Trial]
    stages: list[str] = dataclasses.field(default_factory=list)  # the axis searched at each stage
    grids: dict = dataclasses.field(default_factory=dict)  # {param: {"tried", "chosen", "at_edge"}}

    @property
    def chosen_val(self) -> dict:
        return next(t.val for t in self.trials if t.params == self.chosen)

    @property
    def at_edge(self) -> bool:
        return any(g["at_edge"] for g in self.grids.values())


def normalized(acc: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """Mean over tasks of acc / reference (the individually fine-tuned accuracy)."""
    return float(np.mean([acc[t] / max(reference[t], 1e-9) for t in acc]))


def select_on_validation(spec: MethodSpec, grid: Grid, validate: Callable[[dict], dict],
                         ft_val: Mapping[str, float], progress: Callable[[str], None] | None = None) -> Selection:
    """Run the method's coordinate search; validate(params) -> {task: validation accuracy} of that merge.

    Each axis is line-searched from its starting values at the best values of the others so far; with two
    axes, each is then searched again around its choice (its last step either side, extended past an
    edge, not refined) until a round moves neither, at most `grid.rounds` rounds. Every candidate is
    validated once (a repeated one is looked up); ties keep the earlier candidate, so the outcome does not
    depend on float noise in later ones. A candidate the library refuses (drm_jax.MergeInputError, e.g. a
    non-finite merge) scores -inf and keeps its message in Trial.refused; it is not counted as tried.
    Selection.grids gives, per axis, the values tried at the chosen values of the other axes, and whether
    the chosen value is at an edge of them.
    """
    start, axes = search_plan(spec, grid)
    seen: dict[tuple, Trial] = {}
    trials: list[Trial] = []
    best: list[Trial] = []
    stages: list[str] = []

    def run(params: dict, stage: int) -> Trial:
        key = _key(params)
        if key in seen:
            return seen[key]
        if progress:
            progress(f"{spec.label} {params}")
        try:
            val = validate(dict(params))
            trial = Trial(dict(params), val, normalized(val, ft_val), stage)
        except drm_jax.MergeInputError as error:  # one refused candidate loses; the search goes on
            trial = Trial(dict(params), {}, float("-inf"), stage, refused=str(error))
            if progress:
                progress(f"{spec.label} {params} refused: {error}")
        seen[key] = trial
        trials.append(trial)
        if not best or trial.score > best[0].score:
            best[:] = [trial]
        return trial

    def search(axis: Axis, values, step, refine: int) -> float:
        current = dict(best[0].params) if best else dict(start)
        stages.append(axis.param)
        index = len(stages) - 1
        _, last, _ = line_search(lambda v: run({**current, axis.param: v}, index).score, axis, values,
                                 refine=refine, max_extend=grid.max_extend, step=step)
        return last

    if not axes:
        run(dict(start), 0)
    steps = {axis.param: search(axis, None, None, grid.refine) for axis in axes}
    for _ in range(grid.rounds if len(axes) > 1 else 0):
        moved = False
        for axis in axes:
            centre, step = float(best[0].params[axis.param]), steps[axis.param]
            values = [v for v in (centre - step, centre, centre + step) if axis.inside(v)]
            steps[axis.param] = search(axis, values, step, 0)
            moved |= round(float(best[0].params[axis.param]), 6) != round(centre, 6)
        if not moved:
            break
    chosen = best[0]
    grids = {}
    for axis in axes:
        others = {k: v for k, v in chosen.params.items() if k != axis.param}
        tried = sorted({t.params[axis.param] for t in trials if t.refused is None
                        and {k: v for k, v in t.params.items() if k != axis.param} == others})
        value = chosen.params[axis.param]
        grids[axis.param] = {"tried": tried, "chosen": value, "at_edge": at_edge(axis, value, tried)}
    return Selection(spec.label, dict(chosen.params), trials, stages, grids)


# ------------------------------------------------------------------------------------ learned coefficients
@dataclasses.dataclass(frozen=True)
class AdaConfig:
    """AdaMerging's optimisation: Adam on the coefficients, `steps` steps, each on `batch_per_task`
    unlabeled validation texts of every task (fresh ones each step, cycling).

    relative=True (every profile): Adam runs on each coefficient divided by its starting value, so one
    step moves a coefficient by about `learning_rate` times where it started, whatever the method's scale
    (task arithmetic starts near 0.3, DRM near 1), and coefficients are kept >= 0 (AdaMerging's paper
    clamps them to [0, 1]). relative=False: Adam on the coefficients themselves, unbounded (it drove task
    arithmetic's coefficients from 0.3 to -0.17..0.76 and collapsed some tasks)."""

    steps: int = 12
    batch_per_task: int = 8
    learning_rate: float = 0.02
    relative: bool = True


class AtFixedNumbers:
    """A prepared plan seen by `drm_jax.adamerging`, whose merge(coefficients=c) then merges at the
    method's other chosen numbers (`fixed`: drop rate, lambda_ 1, ...)."""

    def __init__(self, prepared, fixed: Mapping[str, Any] | None = None):
        self.prepared, self.fixed = prepared, dict(fixed or {})
        self.num_models, self.layer_names = prepared.num_models, prepared.layer_names

    def merge(self, coefficients=None):
        return self.prepared.merge(coefficients=coefficients, **self.fixed)


def learn_coefficients(prepared, init, loss_fn: Callable[[Any, Any], Any], batches: Sequence, cfg: AdaConfig,
                       fixed: Mapping[str, Any] | None = None,
                       progress: Callable[[str], None] | None = None) -> tuple[np.ndarray, list[float], Any]:
    """Layer-wise AdaMerging through `drm_jax.adamerging` (docs/methods.md#adamerging): coefficients c
    (K, num_layers) minimising loss_fn(merge(c), batch) by Adam from `init`, at the fixed other numbers
    (the gradient is the method's own derivative, at fixed masks for the masked methods).

    loss_fn(merged_tree, batch) -> scalar (the entropy of the predictions on that batch); batches are
    used in order, cycled. Returns (learned c as numpy, loss per step, the merged tree at c).
    """
    import optax

    losses: list[float] = []

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if progress:
            progress(f"step {step + 1}/{cfg.steps} entropy {loss:.4f}")

    coefficients, merged = drm_jax.adamerging(AtFixedNumbers(prepared, fixed), loss_fn, batches, granularity="layer",
                                              optimizer=optax.adam(cfg.learning_rate), steps=cfg.steps,
                                              init=np.asarray(init, np.float32), relative=cfg.relative,
                                              on_step=on_step)
    return np.asarray(coefficients), losses, merged
