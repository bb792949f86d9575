"""Named merge methods, each a short composition of the stages in `drm_jax.math`.

As `optax.adamw` is `chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)`, `drm` is
`chain(joint_space, renormalize, prune, elect_sign, scale_by_coefficients, disjoint_mean, recompose)`.
A method returns a `MergeMethod`: the chain for DRM linear weights and the chain for every other leaf.
Each works on one layer's task deltas (K, ...) and returns the merged delta; the engine vmaps it over
stacked layers and adds the base.
"""

from __future__ import annotations

from drm_jax.math import decompose, space
from drm_jax.math.elect import elect_sign
from drm_jax.math.mean import disjoint_mean, scale, scale_by_coefficients, sum_tasks, weighted_mean
from drm_jax.math.sparsify import check_fraction, dare_drop, prune, prune_by_threshold
from drm_jax.math.state import MergeMethod, MergeTransform, chain


def _identity(state):
    return state


def ties_like(density: float | None = None) -> MergeTransform:
    """The path (docs/methods.md#other-leaves) of leaves that are not DRM linear weights (biases, norms, embeddings, N-D).

    Optional magnitude trim per task (default none), sign election by mass (majority tie rule),
    lambda_t, disjoint mean.
    """
    trim = _identity if density is None else prune(density, scope="per_task", rule="kthvalue")
    return chain(trim, elect_sign("majority"), scale_by_coefficients(), disjoint_mean("count"))


def drm(
    direction: space.Direction = "horizontal",
    drop_rate: float = 0.8,
    rank_rtol: float = 0.01,
    renormalize: bool = True,
    prune_scope: str = "joint",
    svd_route: decompose.Route = "auto",
    nonlinear_density: float | None = None,
) -> MergeMethod:
    """Decom-Renorm-Merge (Chaichana et al., arXiv 2505.23117).

    Args:
      direction: "horizontal" (DRM-H, default: deltas side by side, shared output-space basis) or
        "vertical" (DRM-V: stacked on top of each other, shared input-space basis).
      drop_rate: fraction p of joint-space entries pruned (default 0.8: keep the top 20%).
      rank_rtol: rank cut, keep singular triplets with S_j > rank_rtol * max(S) (default 0.01).
      renormalize: renormalize each task's block of singular vectors (default True; False is the
        KnOTS-TIES ablation).
      prune_scope: "joint" (docs/methods.md#drm: all tasks ranked together) or "per_task" (the paper's other ablation).
      svd_route: "auto", "dense", "gram" or "qr" (see `drm_jax.math.decompose`).
      nonlinear_density: optional magnitude trim density for non-linear leaves (default: no trim).
    """
    keep = 1.0 - check_fraction("drop_rate", drop_rate)
    linear = chain(
        space.joint_space(direction, rank_rtol, svd_route),
        space.renormalize() if renormalize else _identity,
        prune(keep, scope=prune_scope, rule="kthvalue"),
        elect_sign("majority"),
        scale_by_coefficients(),
        disjoint_mean("count"),
        space.recompose(),
    )
    return MergeMethod(linear=linear, other=ties_like(nonlinear_density))


def knots_ties(
    drop_rate: float = 0.8,
    rank_rtol: float = 0.01,
    direction: space.Direction = "horizontal",
    svd_route: decompose.Route = "auto",
    nonlinear_density: float | None = None,
) -> MergeMethod:
    """KnOTS-TIES (Stoica et al., arXiv 2410.19735): DRM-H without renormalization (docs/methods.md#knots-ties)."""
    return drm(direction, drop_rate, rank_rtol, renormalize=False, svd_route=svd_route,
               nonlinear_density=nonlinear_density)


def ties(density: float = 0.2, trim_scope: str = "tensor", normalize: bool = True,
         lambda_: float = 1.0) -> MergeMethod:
    """TIES-Merging (Yadav et al., arXiv 2306.01708): trim, elect sign, disjoint merge.

    Args:
      density: fraction of each task vector kept by the trim (default 0.2, the paper's k = 20%).
      trim_scope: "tensor" trims each tensor separately and follows mergekit's `ties` to the tensor
        (exactly floor(density N) largest kept, coefficients applied before the sign election, ties of
        the sign go to +, mean weighted by the coefficients of agreeing tasks). "model" (alias "global")
        trims over the whole task vector as the paper does (its `kthvalue` rule, majority tie rule,
        mean over the count of agreeing tasks), with thresholds computed by the engine.
      normalize: divide by the (weighted) count of agreeing tasks (default True); False sums them.
      lambda_: global scaling of the merged delta (default 1).
    """
    density = check_fraction("density", density)
    if trim_scope == "tensor":
        trim, tie, weighting, global_density = prune(density, "per_task", "top_k"), "positive", "coefficients", None
    elif trim_scope in ("model", "global"):
        trim, tie, weighting, global_density = prune_by_threshold(), "majority", "count", density
    else:
        raise ValueError(f"unknown trim_scope {trim_scope!r}; expected 'tensor' or 'model'")
    reduce = disjoint_mean(weighting) if normalize else sum_tasks()
    transform = chain(trim, scale_by_coefficients(), elect_sign(tie), reduce, scale(lambda_))
    return MergeMethod(linear=transform, other=transform, global_density=global_density)


def task_arithmetic(lambda_: float = 1.0) -> MergeMethod:
    """Task arithmetic (Ilharco et al., arXiv 2212.04089): base + lambda * sum_t lambda_t delta_t."""
    transform = chain(scale_by_coefficients(), sum_tasks(), scale(lambda_))
    return MergeMethod(linear=transform, other=transform)


def linear(normalize: bool = True) -> MergeMethod:
    """Weight average: sum_t lambda_t W_t / sum_t lambda_t (model soups; mergekit `linear`).

    With normalize=False it is base + sum_t lambda_t delta_t (a weighted sum of the deltas; mergekit's
    `normalize: false` sums the full weights instead, which the command line reproduces).
    """
    transform = weighted_mean() if normalize else chain(scale_by_coefficients(), sum_tasks())
    return MergeMethod(linear=transform, other=transform)


def dare_linear(drop_rate: float = 0.9, seed: int = 0, rescale: bool = True, lambda_: float = 1.0) -> MergeMethod:
    """DARE (Yu et al., arXiv 2311.03099) then task arithmetic: seeded drop, rescale, weighted sum."""
    del seed  # the engine turns the seed into per-leaf keys
    transform = chain(dare_drop(drop_rate, rescale), scale_by_coefficients(), sum_tasks(), scale(lambda_))
    return MergeMethod(linear=transform, other=transform, random=True)


def dare_ties(drop_rate: float = 0.9, seed: int = 0, rescale: bool = True, normalize: bool = True,
              lambda_: float = 1.0) -> MergeMethod:
    """DARE then TIES' sign consensus (mergekit `dare_ties`): drop, rescale, elect, weighted disjoint mean."""
    del seed
    reduce = disjoint_mean("coefficients") if normalize else sum_tasks()
    transform = chain(dare_drop(drop_rate, rescale), scale_by_coefficients(), elect_sign("positive"), reduce,
                      scale(lambda_))
    return MergeMethod(linear=transform, other=transform, random=True)


def subspace_method(name: str):
    """TSV-M, Iso-C or Iso-CTS as a `MergeMethod` with a fixed alpha (docs/methods.md#subspace-family):
    coefficients scale each task's delta, 2-D weights take the method, other leaves the task mean."""
    from drm_jax.math import subspace
    from drm_jax.math.mean import mean_tasks

    def build(alpha: float = 1.0, common_fraction: float = 0.8) -> MergeMethod:
        stage = {"tsv_m": lambda: subspace.tsv_m_stage(alpha), "iso_c": lambda: subspace.iso_c_stage(alpha),
                 "iso_cts": lambda: subspace.iso_cts_stage(alpha, common_fraction)}[name]()
        return MergeMethod(linear=chain(scale_by_coefficients(), stage),
                           other=chain(scale_by_coefficients(), mean_tasks(), scale(alpha)))

    return build


__all__ = ["subspace_method", "dare_linear", "dare_ties", "drm", "knots_ties", "linear", "task_arithmetic", "ties", "ties_like"]
