"""Pure array math of merging: every stage is a function on arrays, usable under jit and vmap.

Bottom of the dependency tree: nothing here imports the engine, io or the command line.
"""

from drm_jax.math.decompose import JointSpace, choose_route, recompose as recompose_basis, stack_horizontal
from drm_jax.math.elect import elect_sign, elected_sign
from drm_jax.math.mean import (disjoint_mean, disjoint_mean_of, generalized_reduce, mean_tasks, scale,
                               scale_by_coefficients, sum_tasks, weighted_mean, weighted_sum)
from drm_jax.math.sparsify import (dare_drop, magnitude_band, magnitude_mask, prune, prune_by_threshold, ranked_drop,
                                   rescale_l1)
from drm_jax.math.select import keep_at_least_kth, kth_smallest
from drm_jax.math.space import joint_space, recompose, renormalize
from drm_jax.math.state import MergeMethod, MergeState, MergeTransform, chain, init_state, merge_deltas
from drm_jax.math.task_vectors import apply_delta, task_vectors

__all__ = [
    "JointSpace", "MergeMethod", "MergeState", "MergeTransform", "apply_delta", "chain", "choose_route",
    "dare_drop", "disjoint_mean", "disjoint_mean_of", "elect_sign", "elected_sign", "generalized_reduce",
    "init_state", "joint_space", "keep_at_least_kth", "kth_smallest", "magnitude_band", "magnitude_mask",
    "mean_tasks", "merge_deltas", "prune", "prune_by_threshold", "ranked_drop", "recompose", "recompose_basis",
    "renormalize", "rescale_l1", "scale",
    "scale_by_coefficients", "stack_horizontal", "sum_tasks", "task_vectors", "weighted_mean", "weighted_sum",
]
