"""Pytrees of named arrays: flattening with dotted leaf names, and structure checks between models.

Accepts nested dicts, flat dicts of dotted names (Hugging Face style), Flax `params` (FrozenDict) and
NNX `State` (whose Variable leaves flatten to `.value`, stripped from the name).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from drm_jax.errors import MergeInputError, quote

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


def model_label(index: int | None) -> str:
    return "the base model" if index is None else f"model {index}"


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


__all__ = ["FlatTree", "align_models", "flatten", "leaf_name", "model_label", "unflatten"]
