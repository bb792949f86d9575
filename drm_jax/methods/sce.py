"""SCE: select the entries whose task values vary most, weight each task by its energy, erase the minority
signs, merge (docs/methods.md#sce), as mergekit 0.1.5's `sce` does.

mergekit's `sce` has no per-model weight: here the coefficients (1 by default, which is mergekit's merge)
scale each task vector before anything else, and the command line accepts no `weight` for it. The
selected count depends on the data (the number of non-zero variances of each tensor), so it is computed
inside the program; `select_topk` is traced. Nothing is prepared besides the task vectors.
"""

from __future__ import annotations

import jax.numpy as jnp

from drm_jax.math.mean import energy_weighted_mean
from drm_jax.math.select import top_variance_mask
from drm_jax.math.state import broadcast_tasks
from drm_jax.methods.base import INT8_MASK, LayerContext, LayerRule, MethodSpec, Param, Rules, traced_numbers

SELECT_TOPK = Param("select_topk", "fraction", 1.0, "fraction of the entries with non-zero variance over the "
                    "models that is kept, the largest variances first (1: every entry)", traced=True)
# no `weight` alias: mergekit's sce takes no weights, so a YAML weight is refused rather than given a meaning
TASK_SCALES = Param("coefficients", "float", 1.0, "per-model factor on each task vector before the merge (not in "
                    "mergekit, where it is 1)", traced=True, per_model=True)


def merge(deltas, ctx: LayerContext):
    values = deltas * broadcast_tasks(ctx.coefficients.astype(deltas.dtype), deltas)
    selected = top_variance_mask(values, ctx.hparams.select_topk)
    return energy_weighted_mean(jnp.where(selected[None], values, 0.0))


def build(static: dict) -> Rules:
    rule = LayerRule(prepare=None, merge=merge)
    return Rules(linear=rule, other=rule)


layer_hparams = traced_numbers("SceNumbers", "select_topk")


SCE = MethodSpec(
    name="sce",
    summary="SCE: keep the entries of largest variance over the models, energy weights, sign consensus",
    paper="Wan et al., FuseChat: Knowledge Fusion of Chat Models, arXiv 2408.07990",
    params=(SELECT_TOPK, TASK_SCALES, INT8_MASK),
    needs_base=True, elementwise=False, random=False, mergekit=True,
    build=build, layer_hparams=layer_hparams, reference="docs/methods.md#sce",
)

__all__ = ["SCE"]
