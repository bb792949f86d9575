"""WUDI merging, data-free and optimized (docs/methods.md#wudi).

Each 2-D weight on the linear path: the merged task vector found by Adam on WUDI's quadratic loss
(`drm_jax.math.wudi`); every other leaf: the mean of the task vectors. `prepare` computes the loop's
invariant terms (`wudi_terms`: the Gram sums, once per layer), `merge` runs the Adam steps; `iter_num` and
`learning_rate` are traced, so a sweep over them reuses the terms and compiles nothing new. No
coefficients: the method weighs each task by its own norm (FusionBench's WUDI takes none either).
"""

from __future__ import annotations

from drm_jax.math.mean import mean_tasks
from drm_jax.math.wudi import DEFAULT_ITER_NUM, DEFAULT_LEARNING_RATE, wudi_steps, wudi_terms
from drm_jax.methods.base import LayerContext, LayerRule, MethodSpec, Param, Rules, chain_rule, traced_numbers

ITER_NUM = Param("iter_num", "count", DEFAULT_ITER_NUM, "Adam steps per weight (FusionBench's config)",
                 traced=True)
LEARNING_RATE = Param("learning_rate", "nonnegative", DEFAULT_LEARNING_RATE, "Adam's step size", traced=True)

_numbers = traced_numbers("WudiNumbers", "iter_num", "learning_rate", counts=("iter_num",))


def _build(static: dict) -> Rules:
    def merge(terms, ctx: LayerContext):
        return wudi_steps(terms, ctx.hparams.iter_num, ctx.hparams.learning_rate)

    return Rules(linear=LayerRule(prepare=wudi_terms, merge=merge), other=chain_rule(mean_tasks()))


WUDI = MethodSpec(
    name="wudi",
    summary="each 2-D weight's task vector minimizing its interference with every task's own (Adam on a quadratic "
            "loss, data-free); other leaves the mean",
    paper="Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task "
          "Vectors, arXiv 2503.08099",
    params=(ITER_NUM, LEARNING_RATE),
    needs_base=True, elementwise=False, random=False,
    build=_build, layer_hparams=_numbers, reference="docs/methods.md#wudi",
)

__all__ = ["WUDI"]
