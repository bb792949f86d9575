"""DRM (Decom-Renorm-Merge) and KnOTS-TIES: merges in the joint SVD space of the task deltas.

docs/methods.md#drm. `prepare` decomposes each layer's deltas once (DRM steps 1-3: the joint space, its
rows truncated to a rank bucket chosen per group); `merge` is the traced rest,
`chain(enter_prepared, renormalize, prune, elect_sign, scale_by_coefficients, disjoint_mean, recompose,
scale)`, so a new drop rate, rank cut, lambda or set of coefficients reuses the decomposition and the
compiled programs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.math import decompose, lowrank, space
from drm_jax.math.elect import elect_sign
from drm_jax.math.mean import disjoint_mean, scale, scale_by_coefficients
from drm_jax.math.sparsify import prune, prune_counts
from drm_jax.math.state import MergeTransform, chain, init_state, merged_of
from drm_jax.methods.base import (COEFFICIENTS, LAMBDA, FactoredRule, LayerContext, LayerRule, MethodSpec, Param,
                                  Rules, chain_rule, one_minus, scalar)

DIRECTION = Param("direction", "choice", "horizontal", "horizontal (DRM-H: shared output-space basis) or "
                  "vertical (DRM-V: shared input-space basis)", choices=("horizontal", "vertical"))
DROP_RATE = Param("drop_rate", "fraction", 0.8, "fraction of joint-space entries pruned (density = 1 - drop_rate)",
                  traced=True, aliases=("density",), alias_maps=(("density", one_minus),))
RANK_RTOL = Param("rank_rtol", "rtol", 0.01, "rank cut: keep singular triplets with S_j > rank_rtol * max S",
                  traced=True)
PRUNE_SCOPE = Param("prune_scope", "choice", "joint", "joint (all tasks ranked together) or per_task",
                    choices=("joint", "per_task"))
SVD_ROUTE = Param("svd_route", "choice", "auto", "decomposition route (docs/methods.md#numerics)",
                  choices=decompose.ROUTES)
PRECISION = Param("precision", "choice", "auto", "decomposition precision: auto (float64 on CPU, float32 on "
                  "GPU/TPU), float32 or float64", choices=("auto", "float32", "float64"))
NONLINEAR_DENSITY = Param("nonlinear_density", "fraction", None, "magnitude trim density of the leaves that are "
                          "not DRM linear weights (default: no trim)", optional=True)
RENORMALIZE = Param("renormalize", "bool", True, "renormalize each task's block of singular vectors "
                    "(False: the KnOTS-TIES ablation)")

# Relative singular value below which a triplet is numerical zero for the rank buckets (a traced
# rank_rtol below it acts like it): float64 resolves ~1e-8 of the largest, float32 dense ~1e-6, and the
# float32 Gram route only ~3e-4 (squared condition number).
RANK_FLOOR = {"float64": 1e-7, "dense": 1e-6, "qr": 1e-6, "gram": 5e-4}


def _identity(state):
    return state


def ties_like(density: float | None = None) -> MergeTransform:
    """DRM's path for the leaves that are not its linear weights (biases, norms, embeddings, N-D;
    docs/methods.md#other-leaves): an optional magnitude trim per task (default none), sign election by
    mass (majority tie rule), lambda_t, disjoint mean."""
    trim = _identity if density is None else prune(density, scope="per_task", rule="kthvalue")
    return chain(trim, elect_sign("majority"), scale_by_coefficients(), disjoint_mean("count"))


def use_float64(precision: str) -> bool:
    """precision "auto": float64 decompositions where they are cheap (CPU), float32 on accelerators."""
    if precision == "auto":
        return jax.default_backend() == "cpu"
    return precision == "float64"


def _rows(shape: tuple[int, int], k: int, direction: str) -> tuple[int, int]:
    """(q, row length) of the joint space of K deltas of canonical shape (n, m)."""
    n, m = shape
    if direction == "vertical":
        n, m = m, n
    return min(n, k * m), m


def build(static: dict) -> Rules:
    direction, route, precision = static["direction"], static["svd_route"], static["precision"]
    x64 = use_float64(precision)
    in_space = chain(  # steps 4-8: the merged coordinates X in the joint space
        space.renormalize() if static["renormalize"] else _identity,
        prune(None, scope=static["prune_scope"], rule="kthvalue"),
        elect_sign("majority"), scale_by_coefficients(), disjoint_mean("count"),
    )
    joint_stages = chain(in_space, space.recompose(), scale())

    def prepare(deltas):
        k = deltas.shape[0]
        q, _ = _rows(deltas.shape[1:], k, direction)
        d = deltas.astype(jnp.float64) if x64 else deltas
        view, _ = space.horizontal_view(d, direction, "drm")
        chosen = "gram" if x64 and route == "auto" else decompose.choose_route(
            decompose.stack_horizontal(view).shape, decompose.GRAM_MIN_RTOL, route)
        prepared = space.prepared_space(d, direction, chosen, q)
        return jax.tree.map(lambda x: x.astype(deltas.dtype), prepared)

    floor = RANK_FLOOR["float64"] if x64 else RANK_FLOOR[route if route != "auto" else "gram"]

    def shrink(prepared: space.PreparedSpace) -> space.PreparedSpace:
        # the rank bucket of the whole group: every layer's triplets above the numerical floor fit
        s = np.asarray(prepared.singular_values)  # (L, q)
        q = s.shape[1]
        top = s.max(axis=1, keepdims=True)
        needed = int(np.max(np.sum(s > floor * np.where(top > 0, top, 1.0), axis=1), initial=0))
        b = next(b for b in decompose.rank_buckets(q) if b >= max(needed, 1))
        if b == q:
            return prepared
        return space.PreparedSpace(prepared.basis[:, :, :b], prepared.singular_values[:, :b],
                                   prepared.coordinates[:, :, :b])

    def merge(prepared: space.PreparedSpace, ctx: LayerContext):
        state = init_state(prepared.coordinates, ctx.coefficients, ctx.key, ctx.threshold, ctx.hparams)
        return merged_of(joint_stages(space.enter_prepared(prepared, direction)(state)))

    def factored_prepare(b, a, scales):
        # the joint space of the LoRA stack from its factors (docs/methods.md#lora-factored): the same basis,
        # singular values and coordinates as `prepare` on the dense deltas, with q = K r rows
        dtype = b.dtype
        if x64:
            b, a, scales = (jnp.asarray(x, jnp.float64) for x in (b, a, scales))
        joint = lowrank.joint_space_lora(b, a, scales, direction)
        prepared = space.PreparedSpace(joint.basis, joint.singular_values, joint.coordinates)
        return jax.tree.map(lambda x: x.astype(dtype), prepared)

    def factored_merge(prepared: space.PreparedSpace, ctx: LayerContext):
        state = init_state(prepared.coordinates, ctx.coefficients, ctx.key, ctx.threshold, ctx.hparams)
        merged = scale()(in_space(space.enter_prepared(prepared, direction)(state))).merged  # lambda X (q, m)
        if direction == "vertical":  # the merged delta is (U X)^T
            return merged.T, prepared.basis.T
        return prepared.basis, merged

    linear = LayerRule(prepare=prepare, merge=merge, shrink=shrink, x64=x64)
    return Rules(linear=linear, other=chain_rule(chain(ties_like(static["nonlinear_density"]), scale())),
                 row_separable=frozenset() if static["nonlinear_density"] is not None else frozenset({"other"}),
                 scaled_by="lambda_",  # both chains end with scale()
                 factored=FactoredRule(factored_prepare, factored_merge, x64=x64))


class DrmNumbers(NamedTuple):
    """The numbers DRM's rules read for one group: lambda_ (both roles); on the linear role the rank cut and
    the exact pruning counts of the joint space (`prune_counts`, the hook of `prune(None)`, from 1 - drop_rate
    or the density given)."""

    lambda_: Any
    rank_rtol: Any = None
    prune_counts: Any = None


def layer_hparams(values: dict, role: str, shape: tuple[int, ...], k: int, static: dict) -> DrmNumbers:
    """The numbers of one group (`DrmNumbers`)."""
    if role != "matrix":
        return DrmNumbers(scalar(values["lambda_"]))
    q, m = _rows(shape, k, static["direction"])
    counts = prune_counts(one_minus(values["drop_rate"]), (k, q, m), static["prune_scope"], "kthvalue", joint=True)
    return DrmNumbers(scalar(values["lambda_"]), scalar(values["rank_rtol"]), counts)


_PARAMS = (DIRECTION, DROP_RATE, RANK_RTOL, COEFFICIENTS, LAMBDA, PRUNE_SCOPE, SVD_ROUTE, PRECISION,
           NONLINEAR_DENSITY)

DRM = MethodSpec(
    name="drm",
    summary="Decom-Renorm-Merge: joint SVD of the deltas, per-task renormalization, joint pruning, mass sign "
            "election, disjoint mean",
    paper="Chaichana et al., DRM: Decom-Renorm-Merge, arXiv 2505.23117",
    params=_PARAMS[:5] + (RENORMALIZE,) + _PARAMS[5:],
    needs_base=True, elementwise=False, random=False,
    build=build, layer_hparams=layer_hparams, reference="docs/methods.md#drm",
)


def _knots_build(static: dict) -> Rules:
    return build({**static, "renormalize": False})


KNOTS_TIES = MethodSpec(
    name="knots_ties",
    summary="KnOTS-TIES: DRM without renormalization (TIES in the joint SVD space)",
    paper="Stoica et al., Model merging with SVD to tie the KnOTS, arXiv 2410.19735",
    params=_PARAMS,
    needs_base=True, elementwise=False, random=False,
    build=_knots_build, layer_hparams=layer_hparams, reference="docs/methods.md#knots-ties",
)

__all__ = ["DRM", "DrmNumbers", "KNOTS_TIES", "RANK_FLOOR", "build", "layer_hparams", "ties_like", "use_float64"]
