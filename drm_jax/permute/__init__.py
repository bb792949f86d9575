"""Merging models from different initializations: MuDSC (arXiv 2403.01753) and the permutation family
(Git Re-Basin weight matching, activation alignment, ZipIt!, plain averaging).

Layers: `spec` (which axes carry which units) -> `similarity` (weight/activation Pearson) ->
`matching` (Hungarian, two-level blocks, ZipIt greedy) -> `apply` (merge/unmerge, BatchNorm statistics)
-> `methods` (the merges). `models` holds small Flax models matching the spec builders.
"""

from drm_jax.permute.apply import (
    GroupTransform,
    merge_variables,
    permute_variables,
    random_permutations,
    recompute_batch_stats,
)
from drm_jax.permute.methods import (
    METHODS,
    MatchResult,
    activation_align,
    average,
    match_units,
    mudsc,
    permute_merge,
    weight_matching,
    zipit,
)
from drm_jax.permute.spec import (
    ActivationSite,
    AxisMember,
    PermGroup,
    PermutationSpec,
    mlp_spec,
    resnet_spec,
    vit_spec,
)

__all__ = [
    "METHODS",
    "ActivationSite",
    "AxisMember",
    "GroupTransform",
    "MatchResult",
    "PermGroup",
    "PermutationSpec",
    "activation_align",
    "average",
    "match_units",
    "merge_variables",
    "mlp_spec",
    "mudsc",
    "permute_merge",
    "permute_variables",
    "random_permutations",
    "recompute_batch_stats",
    "resnet_spec",
    "vit_spec",
    "weight_matching",
    "zipit",
]
