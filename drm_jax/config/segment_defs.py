"""A merge before its checkpoints are open: the segments a config defines (one for `models`, one per
slice) and the config of plain numbers that stands for one in the checks made before any tensor is read.

`drm_jax.config.recipe.build_recipe` checks a config through `representative`; the streamed segments are
`drm_jax.config.segments`'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from drm_jax.config.schema import MergeConfig, ModelEntry, SliceEntry
from drm_jax.config.settings import FilterList, Gradient, has_per_tensor
from drm_jax.methods.registry import get_method


@dataclass(frozen=True)
class SegmentDef:
    """One merge before its checkpoints are open: method, base, sources (each with its own parameters
    and, in a slice, its `layer_range`), and the shared parameter scopes, highest precedence first."""

    key: str
    method: str
    base_model: str | None
    sources: tuple[ModelEntry, ...]
    scopes: tuple[Mapping[str, Any], ...]


# -- settings without the tensors ---------------------------------------------------------------------
def _some(value: Any) -> Any:
    """A value a setting can take (for the checks made before any tensor is known)."""
    if isinstance(value, Gradient):
        return value.values[0]
    if isinstance(value, FilterList):
        return _some(value.entries[0].value)
    return value


def needs_segments(config: MergeConfig) -> bool:
    """Slices, a module's parameters, or a parameter that varies per tensor."""
    return bool(config.slices) or bool(config.module_parameters) or has_per_tensor(
        config.parameters, *(m.parameters for m in config.models))


def base_policy(spec) -> str:
    """mergekit's base policy of a method: "required", "optional" or "input" (`MethodSpec.base`)."""
    return getattr(spec, "base", "") or ("required" if spec.needs_base else "input")


def slice_def(config: MergeConfig, s: SliceEntry) -> SegmentDef:
    """A slice's merge: its own merge_method and base_model, else the config's. A base that is not
    special to the method ("input": linear, passthrough, ...) is not added to a slice's sources."""
    method = s.merge_method or config.merge_method
    base = s.base_model or config.base_model
    policy = base_policy(get_method(method))
    if policy == "input" or (policy == "optional" and base not in [m.model for m in s.sources]):
        base = None
    return SegmentDef(s.key, method, base, s.sources, (s.parameters, config.module_parameters, config.parameters))


def models_def(config: MergeConfig) -> SegmentDef:
    return SegmentDef("models", config.merge_method, config.base_model, config.models,
                      (config.module_parameters, config.parameters))


def plain_config(config: MergeConfig, seg: SegmentDef, shared: dict, models: Sequence[ModelEntry]) -> MergeConfig:
    return dataclasses.replace(config, merge_method=seg.method, base_model=seg.base_model, parameters=shared,
                               models=tuple(models), slices=(), module_parameters={})


def representative(config: MergeConfig, seg: SegmentDef | None = None) -> MergeConfig:
    """A config of plain numbers standing for a segment (default: the first slice, or the models) in the
    checks that need no tensor: every setting replaced by a value it can take."""
    if seg is None:
        if not needs_segments(config):
            return config
        seg = slice_def(config, config.slices[0]) if config.slices else models_def(config)
    shared: dict[str, Any] = {}
    for scope in reversed(seg.scopes):  # the highest precedence last: it wins
        shared.update({n: _some(v) for n, v in scope.items()})
    models = [ModelEntry(m.model, m.key, {n: _some(v) for n, v in m.parameters.items()}) for m in seg.sources]
    return plain_config(config, seg, shared, models)


__all__ = ["SegmentDef", "base_policy", "models_def", "needs_segments", "plain_config", "representative",
           "slice_def"]
