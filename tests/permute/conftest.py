"""Tiny Flax models with random weights and their specs, shared by the permute tests (built once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
import pytest

from drm_jax.permute import PermutationSpec, mlp_spec, recompute_batch_stats, resnet_spec, vit_spec
from drm_jax.permute.models import MLP, ResNet, ViT


@dataclass
class Case:
    name: str
    apply: Callable[[Any, Any], Any]
    variables: Any
    spec: PermutationSpec
    batches: list
    x: np.ndarray
    init: Callable[[int], Any]


def _make_case(name: str) -> Case:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(24, 8, 8, 3)).astype(np.float32)
    model, spec_fn = {
        "mlp": (MLP(hidden=(16, 12), num_classes=5), mlp_spec),
        "resnet_bn": (ResNet(widths=(8, 8), norm="batch", num_classes=5), resnet_spec),
        "resnet_gn": (ResNet(widths=(8, 8), norm="group", groups=2, num_classes=5),
                      lambda v: resnet_spec(v, norm_groups=2)),
        "vit": (ViT(patch=4, width=8, depth=2, heads=2, mlp_width=12, num_classes=5), vit_spec),
    }[name]
    apply = model.apply
    batches = [images[:12], images[12:]]

    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:2])

    def init(seed: int) -> Any:
        variables = _random_variables(shapes, seed)
        # statistics of the calibration data, so recomputing them reproduces the model exactly
        return recompute_batch_stats(variables, apply, batches) if "batch_stats" in variables else variables

    variables = init(0)
    return Case(name, apply, variables, spec_fn(variables), batches, images, init)


def _random_variables(shapes: Any, seed: int) -> Any:
    """Random weights from numpy for the tree of shapes (Flax's initializers compile slowly on CPU).
    Biases and norm scales are random too, so permuting them is visible."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = leaf.shape
        if name == "mean":
            return np.zeros(shape, np.float32)
        if name == "var":
            return np.ones(shape, np.float32)
        if name == "scale":
            return (1.0 + 0.1 * rng.normal(size=shape)).astype(np.float32)
        if name == "bias":
            return (0.1 * rng.normal(size=shape)).astype(np.float32)
        fan_in = max(1, int(np.prod(shape[:-1])))
        return (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


_CASES: dict[str, Case] = {}


def get_case(name: str) -> Case:
    if name not in _CASES:
        _CASES[name] = _make_case(name)
    return _CASES[name]


@pytest.fixture(scope="session")
def case_factory() -> Callable[[str], Case]:
    return get_case



@pytest.fixture(scope="session")
def trees_equal() -> Callable[[Any, Any], bool]:
    """Bitwise equality of two trees' leaves."""

    def equal(a: Any, b: Any) -> bool:
        la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
        return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))

    return equal
