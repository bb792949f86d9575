"""The subspace family beside DRM: TSV-M, Iso-C and Iso-CTS (docs/methods.md#subspace-family).

Each 2-D weight on the linear path is merged by its method's per-layer function of `drm_jax.math.subspace`
(per-task coefficients scale each task's delta before its decomposition, as the authors' per-task alpha
list does); every other leaf takes the plain task mean. `alpha` scales everything, as in the papers.
Nothing is prepared besides the task vectors; alpha and the coefficients are traced.
"""

from __future__ import annotations

import jax.numpy as jnp

from drm_jax.math import lowrank, subspace
from drm_jax.math.arrays import mm
from drm_jax.math.mean import mean_tasks, scale_by_coefficients
from drm_jax.math.state import chain
from drm_jax.methods.base import (COEFFICIENTS, FactoredRule, LayerContext, LayerRule, MethodSpec, Param, Rules,
                                  chain_rule, traced_numbers)

ALPHA = Param("alpha", "float", 1.0, "global scaling of the merged delta (the papers pick it on validation)",
              traced=True, aliases=("lambda_", "lambda", "scaling"))
COMMON_FRACTION = Param("common_fraction", "fraction", 0.8, "Iso-CTS: fraction of the rank given to the common "
                        "subspace")


def _rule(per_layer, static: dict) -> Rules:
    def merge(deltas, ctx: LayerContext):
        scaled = deltas * ctx.coefficients.astype(deltas.dtype)[:, None, None]
        return per_layer(scaled, ctx.hparams.alpha, static, None)

    def factored_merge(cores: lowrank.LoraCores, ctx: LayerContext):
        # all three are equivariant under orthogonal maps of both sides: merge the cores, map back
        # (docs/methods.md#lora-factored)
        scaled = cores.cores * ctx.coefficients.astype(cores.cores.dtype)[:, None, None]
        merged = per_layer(scaled, ctx.hparams.alpha, static, (cores.left.shape[0], cores.right.shape[0]))
        return mm(cores.left, merged), cores.right.T

    other = chain_rule(chain(scale_by_coefficients(), mean_tasks(), _alpha_scale()))
    return Rules(linear=LayerRule(prepare=None, merge=merge), other=other,
                 factored=FactoredRule(lowrank.lora_cores, factored_merge))


def _alpha_scale():
    def apply(state):  # `scale()` of the global scale, which these methods name alpha
        return state.replace(merged=state.merged * jnp.asarray(state.hparams.alpha, state.merged.dtype))

    return apply


_hparams = traced_numbers("SubspaceNumbers", "alpha")


def _spec(name, summary, paper, per_layer, params=()):
    return MethodSpec(
        name=name, summary=summary, paper=paper, params=(ALPHA, COEFFICIENTS) + tuple(params),
        needs_base=True, elementwise=False, random=False,
        build=lambda static: _rule(per_layer, static), layer_hparams=_hparams,
        reference=f"docs/methods.md#{name.replace('_', '-')}",
    )


TSV_M = _spec("tsv_m", "Task Singular Vectors merge: each task's top singular triplets, orthogonalized jointly",
              "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, arXiv 2412.00081",
              lambda d, a, s, shape: subspace.tsv_merge(d, a, shape))
ISO_C = _spec("iso_c", "Isotropic merge in the common subspace: the summed delta with a flat spectrum",
              "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
              "Subspaces, arXiv 2502.04959", lambda d, a, s, shape: subspace.iso_c(d, a, shape))
ISO_CTS = _spec("iso_cts", "Isotropic merge with common and task-specific subspaces",
                "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
                "Subspaces, arXiv 2502.04959",
                lambda d, a, s, shape: subspace.iso_cts(d, a, s["common_fraction"], shape), (COMMON_FRACTION,))

__all__ = ["ISO_C", "ISO_CTS", "TSV_M"]
