"""Dotted tensor names <-> nested dicts, the tree shape of Flax, Orbax and T5X checkpoints.

Flax trees are nested dicts ({"encoder": {"layer": {"0": {...}}}}); readers name a leaf by joining its
keys with "." ("encoder.layer.0...."), the same way Hugging Face names PyTorch parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from drm_jax.errors import CheckpointError


def flatten_tree(tree: Any, prefix: str = "", is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """Flatten nested dicts/lists into {"a.b.0.c": leaf}; empty containers vanish.

    Keys holding "/" (sharded transformers Flax checkpoints store flat "a/b/c" keys) are split too, so
    both layouts give the same dotted names. `is_leaf(node)` stops the descent at dicts that are values
    (T5X's TensorStore specs).
    """
    if is_leaf is not None and is_leaf(tree):
        return {prefix: tree} if prefix else {}
    if isinstance(tree, dict) and tree:
        items = tree.items()
    elif isinstance(tree, list) and tree:
        items = enumerate(tree)
    elif isinstance(tree, (dict, list)):
        return {}
    else:
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in items:
        part = str(key).replace("/", ".")
        flat.update(flatten_tree(value, f"{prefix}.{part}" if prefix else part, is_leaf))
    return flat


def unflatten_names(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b.c": leaf} -> {"a": {"b": {"c": leaf}}}; raises CheckpointError when names collide
    ("a.b" is both a tensor and a prefix of "a.b.c") or a name has an empty part."""
    tree: dict[str, Any] = {}
    for name, leaf in flat.items():
        parts = name.split(".")
        if not all(parts):
            raise CheckpointError(f"tensor name {name!r} has an empty part")
        node = tree
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CheckpointError(f"tensor names collide: {'.'.join(parts[:depth + 1])!r} and {name!r}")
            node = child
        if parts[-1] in node:
            raise CheckpointError(f"tensor names collide: {name!r} is given twice or is a prefix of another name")
        node[parts[-1]] = leaf
    return tree
