"""Data-aware and learned merges: input Gram matrices, RegMean over trees, RegMean++ block by block, and
AdaMerging's learned coefficients (docs/methods.md#regmean, #regmean-plus-plus, #adamerging).

Sits beside the engine: it uses the array math, the engine's leaf naming, and only the public surface of
a `drm_jax.prepare(...)` result (`merge(coefficients=...)`, `layer_names`, `num_models`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.engine.tree import leaf_name
from drm_jax.errors import MergeInputError
from drm_jax.math.regmean import DEFAULT_REDUCE_NON_DIAGONAL_RATIO, regmean

if TYPE_CHECKING:
    import optax

ApplyFn = Callable[[Any, Any], Any]

# AdaMerging as FusionBench configures it for CLIP: every task-arithmetic coefficient starts at 0.3 (the
# paper's start), Adam at learning rate 1e-3, 1000 steps.
ADAMERGING_INIT = 0.3
ADAMERGING_STEPS = 1000
ADAMERGING_LEARNING_RATE = 1e-3


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """(dotted name, leaf) for each leaf, named as `drm_jax.merge` names leaves."""
    return [(leaf_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ------------------------------------------------------------------------------------ input Gram matrices

def _gram_pass(apply_fn: ApplyFn) -> Callable[[Any, Any], dict]:
    """Jitted (params, batch) -> {Dense module path: (X^T X summed over this batch's rows, row count)};
    one per apply_fn (RegMean++ calls it for every model and block), none kept for an unhashable one."""
    try:
        return _cached_gram_pass(apply_fn)
    except TypeError:
        return _build_gram_pass(apply_fn)


def _build_gram_pass(apply_fn: ApplyFn) -> Callable[[Any, Any], dict]:
    def run(params, batch):
        seen: dict[tuple[str, ...], list] = {}

        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
                x = args[0] if args else kwargs["inputs"]
                rows = x.reshape(-1, x.shape[-1]).astype(jnp.promote_types(x.dtype, jnp.float32))
                gram = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
                path = tuple(context.module.path)
                if path in seen:  # a module called several times: every call's rows count
                    seen[path][0] = seen[path][0] + gram
                    seen[path][1] += rows.shape[0]
                else:
                    seen[path] = [gram, rows.shape[0]]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            apply_fn(params, batch)
        return {"/".join(p): (g, jnp.asarray(n, jnp.float32)) for p, (g, n) in seen.items()}

    return jax.jit(run)


_cached_gram_pass = functools.lru_cache(maxsize=16)(_build_gram_pass)


def _kernel_names(params: Any, module_paths: Sequence[str]) -> dict[str, str]:
    """Module path 'a/b' -> the dotted name of its kernel leaf in `params` (the one whose key path ends in
    ('a', 'b', 'kernel')), so Grams are keyed like the leaves `drm_jax.merge` sees."""
    kernels = [name for name, _ in _named_leaves(params) if name.split(".")[-1] == "kernel"]
    out = {}
    for module in module_paths:
        tail = ".".join(module.split("/") + ["kernel"])
        found = [name for name in kernels if name == tail or name.endswith("." + tail)]
        if len(found) != 1:
            raise MergeInputError(f"Dense module {module!r}: {'no' if not found else len(found)} kernel leaves "
                                  f"of params end in {tail!r}" + (f" ({found})" if found else ""))
        out[module] = found[0]
    return out


def input_grams(apply_fn: ApplyFn, params: Any, batches: Sequence[Any], *, average: bool = True
                ) -> dict[str, jax.Array]:
    """The Gram matrix of every Flax `nn.Dense`'s inputs over `batches`, keyed by its kernel's leaf name.

    apply_fn(params, batch) runs a linen model (e.g. `lambda p, x: model.apply(p, x)`); every nn.Dense
    it calls is observed through `flax.linen.intercept_methods`, its input reshaped to (rows, in).
    One jitted pass per batch (batches of one shape compile once).
    average: True (default) divides by the number of rows, FusionBench's RegMean convention (each model's
      Gram is a mean, whatever its data size); False gives the sum X^T X.
    Returns {kernel leaf name (e.g. 'params.Dense_0.kernel'): (in, in) float32 (or wider) array}.
    """
    batches = list(batches)
    if not batches:
        raise MergeInputError("input_grams: no batches given")
    run = _gram_pass(apply_fn)
    totals: dict[str, list] = {}
    for batch in batches:
        for module, (gram, rows) in run(params, batch).items():
            if module in totals:
                totals[module][0] = totals[module][0] + gram
                totals[module][1] = totals[module][1] + rows
            else:
                totals[module] = [gram, rows]
    if not totals:
        raise MergeInputError("input_grams: apply_fn called no flax.linen.Dense module")
    names = _kernel_names(params, sorted(totals))
    return {names[m]: (g / n if average else g) for m, (g, n) in totals.items()}


# ------------------------------------------------------------------------------------ RegMean on trees

_regmean_jit = jax.jit(regmean)


def regmean_merge(models: Sequence[Any], grams: Sequence[Mapping[str, Any]],
                  reduce_non_diagonal_ratio: float = DEFAULT_REDUCE_NON_DIAGONAL_RATIO) -> Any:
    """RegMean over whole Flax parameter trees (docs/methods.md#regmean).

    models: K trees of one structure. grams: K dicts {kernel leaf name: (in, in) Gram}, as
    `input_grams` gives, with the same keys. A 2-D kernel (in, out) named in the grams is merged by
    `drm_jax.math.regmean.regmean`; every other leaf is the mean of the models.
    Returns a tree in the models' structure.
    """
    if len(models) != len(grams) or not models:
        raise MergeInputError(f"regmean: {len(models)} models and {len(grams)} Gram dicts; one per model")
    keys = set(grams[0])
    for t, g in enumerate(grams[1:], 1):
        if set(g) != keys:
            raise MergeInputError(f"regmean: Gram dict {t} names {sorted(set(g) ^ keys)[:3]} that dict 0 "
                                  f"does not (or the reverse)")
    leaves = [_named_leaves(m) for m in models]
    treedef = jax.tree_util.tree_structure(models[0])
    names = [name for name, _ in leaves[0]]
    unknown = keys - set(names)
    if unknown:
        raise MergeInputError(f"regmean: Gram matrices for {sorted(unknown)[:3]}, not leaves of the models")
    merged = []
    for i, name in enumerate(names):
        stacked = jnp.stack([jnp.asarray(model[i][1]) for model in leaves])
        if name in keys:
            g = jnp.stack([jnp.asarray(gram[name]) for gram in grams])
            if stacked.ndim != 3 or g.shape[1:] != (stacked.shape[1],) * 2:
                raise MergeInputError(f"regmean: leaf {name!r} of shape {stacked.shape[1:]} with Gram of shape "
                                      f"{g.shape[1:]}: expected a 2-D (in, out) kernel and an (in, in) Gram")
            merged.append(_regmean_jit(stacked, g, reduce_non_diagonal_ratio))
        else:
            merged.append(jnp.mean(stacked, axis=0).astype(stacked.dtype))
    return jax.tree_util.tree_unflatten(treedef, merged)


def regmean_plusplus(block_applies: Sequence[ApplyFn], blocks: Sequence[Sequence[Any]],
                     inputs: Sequence[Sequence[Any]],
                     reduce_non_diagonal_ratio: float = DEFAULT_REDUCE_NON_DIAGONAL_RATIO) -> list[Any]:
    """RegMean++ (docs/methods.md#regmean-plus-plus): RegMean block after block, each block's input Grams
    taken from the partially merged model.

    block_applies: one `apply(block_params, x) -> y` per block (the same function repeated for identical
      blocks); y is the next block's input.
    blocks: blocks[b][t] = block b's parameters in model t (K models).
    inputs: inputs[t] = the batches of task t's inputs to the first block (the merged embedding's output,
      say; embeddings and heads are the caller's).
    For block b, model t's Grams come from running model t's own block b on task t's inputs as the merged
    blocks 0..b-1 left them; the merged block b (`regmean_merge`) then carries each task's inputs on.
    Returns the merged blocks, one parameter tree per block.
    """
    if len(block_applies) != len(blocks):
        raise MergeInputError(f"regmean_plusplus: {len(block_applies)} apply functions for {len(blocks)} blocks")
    k = len(inputs)
    for b, block in enumerate(blocks):
        if len(block) != k:
            raise MergeInputError(f"regmean_plusplus: block {b} has {len(block)} models, inputs {k} tasks")
    streams = [list(task) for task in inputs]
    merged_blocks = []
    for apply, block in zip(block_applies, blocks):
        grams = [input_grams(apply, block[t], streams[t]) for t in range(k)]
        merged = regmean_merge(block, grams, reduce_non_diagonal_ratio)
        merged_blocks.append(merged)
        forward = jax.jit(apply)
        streams = [[forward(merged, x) for x in stream] for stream in streams]
    return merged_blocks


# ------------------------------------------------------------------------------------ AdaMerging

def entropy_loss(apply_fns: Sequence[ApplyFn]) -> Callable[[Any, Sequence[Any]], jax.Array]:
    """AdaMerging's objective (docs/methods.md#adamerging): loss(merged, batches) = mean over tasks t of
    the mean Shannon entropy (nats) of softmax(apply_fns[t](merged, batches[t])) over the last axis.

    apply_fns: one `apply(params, batch) -> logits (..., classes)` per task (its head on the merged body).
    The returned loss takes one batch per task, in the order of apply_fns. (FusionBench sums the tasks'
    entropies and adds 1e-8 inside the log; Adam's steps do not depend on the factor K, and log_softmax
    needs no guard.)
    """
    apply_fns = list(apply_fns)

    def loss(merged, batches):
        if len(batches) != len(apply_fns):
            raise MergeInputError(f"entropy_loss: {len(batches)} batches for {len(apply_fns)} tasks")
        per_task = []
        for apply, batch in zip(apply_fns, batches):
            log_p = jax.nn.log_softmax(apply(merged, batch), axis=-1)
            per_task.append(jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p, axis=-1)))
        return jnp.mean(jnp.stack(per_task))

    return loss


def adamerging(prepared: Any, loss_fn: Callable[[Any, Any], jax.Array], batches: Sequence[Any], *,
               granularity: str = "task", optimizer: optax.GradientTransformation | None = None,
               steps: int = ADAMERGING_STEPS, init: Any = ADAMERGING_INIT, relative: bool = False,
               on_step: Callable[[int, float], None] | None = None) -> tuple[jax.Array, Any]:
    """Learn merge coefficients by gradient descent on an unlabeled loss (AdaMerging, arXiv 2310.02575).

    prepared: a `drm_jax.prepare(...)` result whose `merge(coefficients=c)` is differentiable in c.
    loss_fn(merged_tree, batch) -> scalar, e.g. `entropy_loss(apply_fns)`.
    batches: a sequence, cycled: step i uses batches[i % len(batches)].
    granularity: "task" learns c of shape (K,) (task-wise AdaMerging); "layer" learns (K, num_layers),
      one coefficient per model and merged leaf, columns in the order of `prepared.layer_names`.
    optimizer: default optax.adam(1e-3).
    steps: default 1000 (with lr and init, FusionBench's CLIP config).
    init: starting coefficients, a scalar, (K,) or (K, num_layers); default 0.3, the paper's start for
      task-arithmetic-style merges (sum of scaled task vectors). Methods whose coefficients are weights
      of a mean (linear) or whose neutral value is 1 (DRM) want init=1/K or 1.
    relative: Adam runs on c / init (init > 0; others on the absolute scale) and the result is kept >= 0,
      so one step moves each coefficient by about the learning rate times its start, whatever the
      method's scale (examples/text_tasks' profiles found unbounded absolute steps collapsing tasks).
    on_step(step, loss): called after each step with the loss before it.
    Returns (coefficients, merged tree at those coefficients).
    """
    import optax  # here, not at the top: it adds about 0.3 s to `import drm_jax` (the command line's start)

    if granularity not in ("task", "layer"):
        raise MergeInputError(f"adamerging: granularity must be 'task' or 'layer', got {granularity!r}")
    batches = list(batches)
    if not batches:
        raise MergeInputError("adamerging: no batches given")
    k = prepared.num_models
    shape = (k,) if granularity == "task" else (k, len(prepared.layer_names))
    dtype = jax.dtypes.canonicalize_dtype(np.float64)  # float32, or float64 under jax_enable_x64
    start = np.asarray(init, dtype)
    if start.ndim == 1 and granularity == "layer":
        start = start[:, None]
    try:
        start = np.broadcast_to(start, shape)
    except ValueError:
        raise MergeInputError(f"adamerging: init of shape {start.shape} does not fit coefficients {shape}") from None
    scale = np.where(start > 0, start, 1).astype(dtype) if relative else np.ones(shape, dtype)
    optimizer = optax.adam(ADAMERGING_LEARNING_RATE) if optimizer is None else optimizer

    def objective(variable, batch):
        return loss_fn(prepared.merge(coefficients=variable * scale), batch)

    @jax.jit
    def step(variable, state, batch):
        loss, grad = jax.value_and_grad(objective)(variable, batch)
        updates, state = optimizer.update(grad, state, variable)
        variable = optax.apply_updates(variable, updates)
        if relative:
            variable = jnp.maximum(variable, 0)
        return variable, state, loss

    variable = jnp.asarray(start / scale)
    state = optimizer.init(variable)
    for i in range(steps):
        variable, state, loss = step(variable, state, batches[i % len(batches)])
        if on_step is not None:
            on_step(i, float(loss))
    coefficients = variable * scale
    return coefficients, prepared.merge(coefficients=coefficients)
