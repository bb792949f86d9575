"""RAM and RAM+ (tensor-local): keep the task values above a small epsilon, average where models overlap,
keep a value alone where one model reaches it (docs/methods.md#ram, docs/methods.md#ramplus-tl), as
mergekit 0.1.5's `ram` and `ramplus_tl` do.

mergekit's RAM methods take no per-model weight: here the coefficients (1 by default, which is mergekit's
merge) scale each task vector first, and the command line accepts no `weight` for them. Every number
(epsilon, r, alpha, the coefficients) is traced; nothing is prepared besides the task vectors. `ram` is
elementwise; `ramplus_tl` counts over the whole tensor.
"""

from __future__ import annotations

from drm_jax.math.mean import overlap_mean, overlap_mean_plus
from drm_jax.math.state import broadcast_tasks
from drm_jax.methods.base import LayerContext, LayerRule, MethodSpec, Param, Rules, traced_numbers
from drm_jax.methods.sce import TASK_SCALES

EPSILON = Param("epsilon", "float", 1e-5, "a task value takes part where its magnitude exceeds epsilon", traced=True)
R = Param("r", "float", 0.1, "RAM+: strength of the boost of a model's unique entries", traced=True)
ALPHA = Param("alpha", "float", 0.2, "RAM+: cap of the shared-to-unique ratio rho in the boost 1 + r clip(rho, 0, "
              "alpha)", traced=True)


def _scaled(deltas, ctx: LayerContext):
    return deltas * broadcast_tasks(ctx.coefficients.astype(deltas.dtype), deltas)


def _merge_ram(deltas, ctx: LayerContext):
    return overlap_mean(_scaled(deltas, ctx), ctx.hparams.epsilon)


def _merge_plus(deltas, ctx: LayerContext):
    h = ctx.hparams
    return overlap_mean_plus(_scaled(deltas, ctx), h.epsilon, h.r, h.alpha)


def _build_ram(static: dict) -> Rules:
    rule = LayerRule(prepare=None, merge=_merge_ram)
    return Rules(linear=rule, other=rule, row_separable=frozenset({"matrix", "other"}))


def _build_plus(static: dict) -> Rules:
    rule = LayerRule(prepare=None, merge=_merge_plus)
    return Rules(linear=rule, other=rule)


_hparams_ram = traced_numbers("RamNumbers", "epsilon")
_hparams_plus = traced_numbers("RamPlusNumbers", "epsilon", "r", "alpha")


_PAPER = "Reinforced Agent Merging (RAM), arXiv 2601.13572"

RAM = MethodSpec(
    name="ram",
    summary="RAM: values above epsilon, averaged where models overlap, kept alone where one model reaches them",
    paper=_PAPER, params=(EPSILON, TASK_SCALES),
    needs_base=True, elementwise=True, random=False, mergekit=True,
    build=_build_ram, layer_hparams=_hparams_ram, reference="docs/methods.md#ram",
)

RAMPLUS_TL = MethodSpec(
    name="ramplus_tl",
    summary="RAM+ (tensor-local): RAM with each model's unique entries boosted by its shared-to-unique ratio",
    paper=_PAPER, params=(R, ALPHA, EPSILON, TASK_SCALES),
    needs_base=True, elementwise=False, random=False, mergekit=True,
    build=_build_plus, layer_hparams=_hparams_plus, reference="docs/methods.md#ramplus-tl",
)

__all__ = ["RAM", "RAMPLUS_TL"]
