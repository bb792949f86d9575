"""Pytrees of named arrays: flattening with dotted leaf names, and structure checks between models.

Accepts nested dicts, flat dicts of dotted names (Hugging Face style, NumPy/JAX arrays or torch tensors),
Flax `params` (FrozenDict) and NNX `State` (whose Variable leaves flatten to `.value`, stripped from the
name; RNG keys and counters are leaves that are not floating, kept at their base value).

`host_array` turns a torch tensor into a NumPy array the merge can read; `like_leaf` gives a merged leaf
back in the base leaf's own type and dtype (a torch tensor for a torch tensor, float64 for a float64 leaf
that JAX without x64 merged in float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from drm_jax.errors import MergeInputError, clip, quote

_VARIABLE_SUFFIXES = (".value", ".raw_value")


def leaf_name(path: tuple) -> str:
    """Dotted name of a pytree path, e.g. ('encoder', 'layer', 0, 'kernel') -> 'encoder.layer.0.kernel'."""
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    for suffix in _VARIABLE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


class FlatTree(NamedTuple):
    names: list[str]
    leaves: list[Any]
    treedef: Any


def flatten(tree: Any) -> FlatTree:
    """Leaves of a pytree with their dotted names, in flattening order."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [leaf_name(p) for p, _ in with_path]
    return FlatTree(names, [leaf for _, leaf in with_path], treedef)


def unflatten(flat: FlatTree, leaves: Sequence[Any]) -> Any:
    return jax.tree_util.tree_unflatten(flat.treedef, list(leaves))


def _is_torch_tensor(leaf: Any) -> bool:
    return type(leaf).__module__.split(".")[0] == "torch" and hasattr(leaf, "detach")


def host_array(leaf: Any, name: str) -> Any:
    """A leaf as an array JAX can read: a torch tensor (a PyTorch `state_dict()`) becomes a NumPy array
    sharing its memory (bfloat16 through its bits, ml_dtypes' bfloat16); any other leaf is returned as is.

    Raises MergeInputError naming the leaf for a torch dtype NumPy cannot hold (float8, complex32, ...).
    """
    if not _is_torch_tensor(leaf):
        return leaf
    import torch  # present: the leaf is a torch tensor

    tensor = leaf.detach().cpu()
    try:
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
        return tensor.numpy()
    except (TypeError, RuntimeError):
        raise MergeInputError(f"leaf {clip(name)!r}: torch dtype {str(tensor.dtype).removeprefix('torch.')} has "
                              f"no NumPy equivalent; convert the tensor to float32, float16 or bfloat16") from None


def like_leaf(merged: Any, original: Any) -> Any:
    """A merged leaf in the type and dtype of the base's leaf `original`.

    A torch tensor gives a torch tensor of its dtype on its device. A float64 NumPy leaf merged in float32
    (JAX without jax_enable_x64 holds no float64 array) is cast back to float64 on the host and returned as
    a NumPy array; under a trace (jax.grad) the traced value is returned as it is.
    """
    if isinstance(merged, jax.core.Tracer):
        return merged
    if _is_torch_tensor(original):
        import torch  # present: the base leaf is a torch tensor

        host = np.asarray(merged)
        if original.dtype == torch.bfloat16:
            out = torch.from_numpy(np.array(host.astype(jnp.bfloat16).view(np.int16))).view(torch.bfloat16)
        else:
            out = torch.from_numpy(np.array(host, dtype=torch.empty((), dtype=original.dtype).numpy().dtype))
        return out.to(original.device)
    want = getattr(original, "dtype", None)
    if want is not None and isinstance(want, np.dtype) and np.dtype(merged.dtype) != want:
        return np.asarray(merged).astype(want)
    return merged


def model_label(index: int | None) -> str:
    return "the base model" if index is None else f"model {index}"


def tree_list(trees: Any, what: str = "models", one: str = "tree") -> list[Any]:
    """`trees` as a list, refusing one tree (a mapping: a dict of leaves, Flax params, an NNX State) given in
    place of a list of trees, which would otherwise be read as a list of its keys."""
    if isinstance(trees, Mapping):
        raise MergeInputError(f"{what} must be a list of {one}s, got a {type(trees).__name__}; for one {one} "
                              f"pass [{one}]")
    return list(trees)


def align_models(base: FlatTree, models: Sequence[Any]) -> list[list[Any]]:
    """Each model's leaves in the base's leaf order, after checking names and shapes.

    Raises MergeInputError naming the first leaf that is missing, extra or of a different shape.
    """
    aligned = []
    base_shapes = [np.shape(x) for x in base.leaves]
    for index, model in enumerate(models):
        flat = flatten(model)
        by_name = dict(zip(flat.names, flat.leaves))
        if len(by_name) != len(flat.names):
            raise MergeInputError(f"{model_label(index)} has duplicate leaf names")
        missing = [n for n in base.names if n not in by_name]
        if missing:
            raise MergeInputError(f"{model_label(index)} has no leaf {missing[0]!r} that the base model has")
        extra = sorted(set(by_name) - set(base.names))
        if extra:
            raise MergeInputError(f"{model_label(index)} has a leaf {extra[0]!r} that the base model lacks")
        leaves = [by_name[n] for n in base.names]
        for name, shape, leaf in zip(base.names, base_shapes, leaves):
            if np.shape(leaf) != shape:
                raise MergeInputError(
                    f"leaf {quote(name)}: {model_label(index)} has shape {tuple(np.shape(leaf))}, "
                    f"the base model {tuple(shape)}"
                )
        aligned.append(leaves)
    return aligned


__all__ = ["align_models", "flatten", "host_array", "leaf_name", "like_leaf", "model_label", "tree_list", "unflatten"]
