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

    def init(seed: int) -> Any:
        variables = model.init(jax.random.PRNGKey(seed), images[:2])
        # statistics of the calibration data, so recomputing them reproduces the model exactly
        return recompute_batch_stats(variables, apply, batches) if "batch_stats" in variables else variables

    variables = init(0)
    return Case(name, apply, variables, spec_fn(variables), batches, images, init)


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
