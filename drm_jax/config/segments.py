"""The merges a config asks for: segments of output tensors, each one streamed merge with its own
sources, method and numbers (mergekit's planner, without its per-tensor task graph).

- A `models` config is one segment: every tensor of the reference, merged from the same tensor of each
  model. Parameters given as gradients or filter lists (`drm_jax.config.settings`) resolve to one value
  per tensor; the tensors whose values differ from the segment's reach the engine as `leaf_params`
  (one vmapped program per group still: the engine stacks the values with the layers).
- A `slices` config (or `modules.default.slices`) is a frankenmerge: the tensors before the layers
  (embeddings) merged from the first slice's sources, then each slice's layers, renumbered from 0 in
  output order (`model.layers.<i>`), each merged from its sources' own layers (`layer_range`), then the
  tensors after the layers (final norm, LM head) from the last slice's sources, as mergekit plans them.
  The layer position t of a gradient is i / (n - 1) within each slice (1 for a slice of one layer), 0
  for the tensors before and after the layers. The written config.json gets the output's layer count.

Per tensor, each scope's settings are resolved to numbers and the result is translated by
`drm_jax.config.recipe.build_recipe` like any config of plain numbers: defaults, aliases and mergekit's
rules stay in one place. Layer naming per architecture is the table of `drm_jax.arch` (read through
`drm_jax.io.architectures`). A model of several layer stacks (T5's encoder and decoder, CLIP's text and
vision towers) is sliced stack by stack with the same `layer_range` (each stack must have those layers),
and a gradient's t is the layer's position within its own stack.

`drm_jax.config.plan.plan_config` decides the segments from the inputs' headers (this module's per-tensor
values and views); `bind_segments` builds each `Segment` of a plan over the open readers at run time and
`merge_segments` streams them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from drm_jax.config.recipe import build_recipe
from drm_jax.config.schema import MergeConfig, ModelEntry, per_model_names
from drm_jax.config.segment_defs import SegmentDef, plain_config, representative, slice_def
from drm_jax.config.settings import FilterList, Gradient, resolve
from drm_jax.config.vocabulary import align_views
from drm_jax.engine.roles import RoleRules, unmatched_message
from drm_jax.engine.sources import CheckpointSources, stream_merge
from drm_jax.errors import CheckpointError, ConfigError, MergeInputError, clip, quote
from drm_jax import arch as arch_data
from drm_jax.io import architectures as arch_lib
from drm_jax.io.base import json_object_or_none
from drm_jax.io.dtypes import is_floating
from drm_jax.methods.registry import get_method


@dataclass
class Segment:
    """One streamed merge at run time: a planned segment (`drm_jax.config.plan.SegmentPlan`) bound to the
    open readers (`bind_segments`): its checked sources, method, engine parameters and per-tensor values."""

    key: str
    sources: Any  # drm_jax.engine.sources.CheckpointSources
    method: str
    params: dict
    leaf_params: dict | None = None


def check_segments(config: MergeConfig) -> None:
    """Every slice's parameters and inputs checked (as `build_recipe` checks a config), before any
    checkpoint is opened."""
    for s in config.slices:
        build_recipe(representative(config, slice_def(config, s)))


def check_patterns(segments: Sequence[Any]) -> None:
    """A config's include / exclude / ignore pattern that matches no tensor of the segments that take it is
    refused, naming it: a typo would change the merge without a word (`RoleRules.unmatched`; the default
    exclusions are exempt). segments: `drm_jax.config.plan.SegmentPlan`s."""
    missed: list[tuple[str, str]] | None = None
    for seg in segments:
        here = RoleRules(**seg.role_kwargs).unmatched(list(seg.names))
        missed = here if missed is None else [m for m in missed if m in here]
    if missed:
        what, pattern = missed[0]
        raise MergeInputError(unmatched_message(f"parameters.{what}", pattern, list(segments[0].names), "tensor"))


# -- per-tensor values ---------------------------------------------------------------------------------
class TensorParams:
    """Resolves a segment's settings for each tensor and translates them with `build_recipe`."""

    def __init__(self, config: MergeConfig, seg: SegmentDef):
        self.config, self.seg = config, seg
        self.per_model = per_model_names(seg.method)
        self.shared_names = sorted({n for scope in seg.scopes for n in scope})
        self._cache: dict[Any, Any] = {}

    def recipe(self, out_name: str, in_names: Sequence[str], t: float):
        """The recipe of one tensor: `in_names[k]` is its name in source k (filters of per-model values
        match it), `out_name` its output name (filters of shared values match it)."""
        seg = self.seg
        shared = {}
        for n in self.shared_names:
            value = resolve(n, seg.scopes, out_name, t)
            if value is not None:
                shared[n] = value
        models = []
        for src, name in zip(seg.sources, in_names):
            own = {}
            for n in sorted(set(src.parameters) | (self.per_model & set(self.shared_names))):
                value = resolve(n, (src.parameters,) + seg.scopes, name, t)
                if value is not None:
                    own[n] = value
            models.append(ModelEntry(src.model, src.key, own))
        key = (tuple(sorted(shared.items())), tuple(tuple(sorted(m.parameters.items())) for m in models))
        if key not in self._cache:
            try:
                self._cache[key] = build_recipe(plain_config(self.config, seg, shared, models))
            except ConfigError as err:
                raise ConfigError(f"{err} (for tensor {clip(out_name)!r})") from None
        return self._cache[key]


def per_tensor_params(resolver: TensorParams, names: Sequence[str], in_names: Sequence[Sequence[str]],
                      ts: Sequence[float], merged: Sequence[bool]) -> tuple[dict, dict | None]:
    """(the segment's engine parameters, leaf_params for the tensors whose traced values differ)."""
    spec = get_method(resolver.seg.method)
    traced = {p.name for p in spec.traced}
    recipes = {i: resolver.recipe(names[i], [n[i] for n in in_names], ts[i]) for i in range(len(names)) if merged[i]}
    if not recipes:
        return resolver.recipe(names[0], [n[0] for n in in_names], ts[0]).engine_kwargs, None
    counts = Counter(id(r) for r in recipes.values())
    default = next(r for r in recipes.values() if counts[id(r)] == max(counts.values())).engine_kwargs
    leaf: dict[str, dict] = {}
    for i, r in recipes.items():
        kw = r.engine_kwargs
        for k in set(kw) | set(default):
            if k not in traced and kw.get(k) != default.get(k):
                raise ConfigError(f"{resolver.seg.key}: {k} differs between tensors ({clip(names[i])!r}); a static "
                                  f"parameter takes one value per slice")
        own = {k: v for k, v in kw.items() if k in traced and v != default.get(k)}
        if own:
            leaf[names[i]] = own
    return dict(default), (leaf or None)


def layer_positions(arch: str, names: Sequence[str], counts: Mapping[str, tuple[str, int]]) -> list[float]:
    """t of each tensor of a `models` merge: layer i of n (in its stack) -> i / (n - 1) (1 if n = 1); 0
    outside the layers. counts: {stack name: (config.json key, layer count)}."""
    out = []
    for name in names:
        index = arch_lib.layer_index(arch, name)
        stack = arch_lib.layer_stack(arch, name)
        if index is None or stack is None or stack.name not in counts:
            out.append(0.0)
            continue
        key, num_layers = counts[stack.name]
        if index >= num_layers:  # a gradient would be read past its last value
            raise CheckpointError(f"tensor {quote(name)} is in layer {index}, but config.json's {key} is "
                                  f"{num_layers} (layers 0 to {num_layers - 1})")
        out.append(index / (num_layers - 1) if num_layers > 1 else 1.0)
    return out


def gradient_key(seg: SegmentDef) -> str | None:
    """The config key of the first gradient of a segment (a value over layers), or None."""
    def has_gradient(v):
        return isinstance(v, Gradient) or (isinstance(v, FilterList) and any(isinstance(e.value, Gradient)
                                                                              for e in v.entries))
    for src in seg.sources:
        for n, v in src.parameters.items():
            if has_gradient(v):
                return f"{src.key}.parameters.{n}"
    for scope in seg.scopes:
        for n, v in scope.items():
            if has_gradient(v):
                return n
    return None


def layer_counts(arch: str, model_config: Callable[[], dict | None], names: Sequence[str]
                 ) -> dict[str, tuple[str, int]]:
    """{stack name: (config.json key, layer count)}: the count of config.json (e.g. num_hidden_layers), else
    one past the highest layer index of the stack in the tensor names (a config.json without the count
    must not put every layer at t = 0); stacks with neither are left out. model_config(): the reference's
    config.json (`drm_jax.config.plan.ModelHeader.config`)."""
    row = arch_lib.layer_naming(arch)
    if row is None:
        return {}
    model_config = model_config() or {}
    counts = {}
    for stack in row.stacks:
        key = arch_lib.num_layers_key(stack, model_config)
        value = arch_lib.config_value(model_config, key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            counts[stack.name] = (key, value)
            continue
        indices = [arch_lib.layer_index(arch, n) for n in names if arch_lib.layer_stack(arch, n) is stack]
        if indices:
            counts[stack.name] = (key, max(indices) + 1)
    return counts


def require_layer_naming(arch: str, what: str, model_config: Callable[[], dict | None]) -> arch_data.Architecture:
    """The architecture table's row, or one line naming what is missing for `what` (slices, a gradient);
    model_config(): the reference's config.json."""
    row = arch_lib.layer_naming(arch)
    if row is None:
        model_config = model_config() or {}
        model_type = model_config.get("model_type")
        which = (f"config.json's model_type {clip(str(model_type))!r}" if model_type
                 else "a model without a config.json model_type")
        known = ", ".join(sorted(arch_data.MODEL_TYPES))
        raise ConfigError(f"{what} needs each tensor's layer index, and drm-jax's architecture table (drm_jax/arch.py) "
                          f"has no layer naming for {which}; it knows the model types {known}")
    return row


# -- views --------------------------------------------------------------------------------------------
class RenamedView:
    """A reader's tensors under output names: {output name: the reader's own name}."""

    def __init__(self, view: Any, names: Mapping[str, str]):
        self.view, self._names = view, dict(names)
        self.format = getattr(view, "format", "hf")
        self.path = getattr(view, "path", None)
        self.config_dir = getattr(view, "config_dir", None)

    def keys(self) -> list[str]:
        return list(self._names)

    def _own(self, name: str) -> str:
        try:
            return self._names[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def shape(self, name: str):
        return self.view.shape(self._own(name))

    def dtype(self, name: str):
        return self.view.dtype(self._own(name))

    def get(self, name: str):
        return self.view.get(self._own(name))

    def close(self) -> None:  # the underlying reader belongs to the caller
        pass


# -- binding a plan to readers -------------------------------------------------------------------------
def input_views(refs: Sequence[str], views: Sequence[Any], vocabulary: Any, cast: np.dtype | None) -> list[Any]:
    """The inputs' views as a merge reads them (`refs[i]` is the config reference of `views[i]`): with a
    vocabulary plan, the vocabulary tensors rewritten to the output vocabulary
    (`drm_jax.config.vocabulary.align_views`; `cast`: the config's dtype)."""
    if vocabulary is None:
        return list(views)
    return align_views(vocabulary, list(refs), list(views), cast)


def segment_sources(seg: Any, reference: Any, models: Sequence[Any], out_dtype: np.dtype | None
                    ) -> CheckpointSources:
    """CheckpointSources of a planned segment (`drm_jax.config.plan.SegmentPlan`) over views of its reference
    and models: renamed to the output names (`seg.in_names`), the reference's dtypes promoted
    (`seg.promote`). Reads headers only: over header views it is the plan's own check."""
    if seg.in_names is not None:
        reference = RenamedView(reference, dict(zip(seg.names, seg.in_names[seg.reference])))
        models = [RenamedView(view, dict(zip(seg.names, seg.in_names[ref]))) for view, ref in zip(models, seg.models)]
    models = list(models)
    if seg.promote:
        reference = PromotedView(reference, models)
    return CheckpointSources(reference, models, list(seg.labels), seg.reference_label,
                             role_kwargs=dict(seg.role_kwargs), zero_base=seg.zero_base,
                             exact_roles=seg.exact_roles, out_dtype=out_dtype)


def bind_segments(plan: Any, views: Sequence[Any]) -> tuple[list[Segment], Any]:
    """(the segments of a plan (`drm_jax.config.plan.ConfigPlan`) over the open views of its inputs, in
    `plan.entries` order; the reference view whose config.json and writer format the output takes)."""
    views = input_views(plan.entries, views, plan.vocabulary, plan.cast_dtype)
    out_dtype = plan.out_numpy_dtype

    def segment(seg, sources) -> Segment:
        leaf = None if seg.leaf_params is None else {k: dict(v) for k, v in seg.leaf_params.items()}
        return Segment(seg.key, sources, seg.method, dict(seg.params), leaf)

    if plan.kind == "models":
        seg = plan.segments[0]
        sources = segment_sources(seg, views[0], views[1:], out_dtype)
        return [segment(seg, sources)], sources.reference
    by_ref = dict(zip(plan.entries, views))
    segments = [segment(seg, segment_sources(seg, by_ref[seg.reference], [by_ref[m] for m in seg.models], out_dtype))
                for seg in plan.segments]
    return segments, by_ref[plan.reference]


# -- running them ---------------------------------------------------------------------------------------
def promoted_dtype(dtypes: Sequence[Any]) -> np.dtype:
    """torch's promotion of floating dtypes (mergekit's output dtype when neither dtype nor out_dtype is
    set): the wider of two, float32 for float16 with bfloat16."""
    out = np.dtype(dtypes[0])
    for d in dtypes[1:]:
        d = np.dtype(d)
        if d == out:
            continue
        if {d.name, out.name} == {"float16", "bfloat16"}:
            out = np.dtype(np.float32)
        else:
            out = d if d.itemsize > out.itemsize else out
    return out


class PromotedView:
    """The reference seen with each floating tensor's dtype promoted over every input of the merge, so the
    engine writes mergekit's default output dtype (neither dtype nor out_dtype given): a float32 model
    merged into a bfloat16 base gives float32."""

    def __init__(self, reference: Any, models: Sequence[Any]):
        self.reference, self.models = reference, list(models)
        self.format = getattr(reference, "format", "hf")
        self.path = getattr(reference, "path", None)
        self.config_dir = getattr(reference, "config_dir", None)
        self._present = [set(m.keys()) for m in self.models]

    def keys(self) -> list[str]:
        return self.reference.keys()

    def shape(self, name: str):
        return self.reference.shape(name)

    def dtype(self, name: str):
        own = np.dtype(self.reference.dtype(name))
        if not is_floating(own):
            return own
        others = [np.dtype(m.dtype(name)) for m, present in zip(self.models, self._present) if name in present]
        return promoted_dtype([own] + [d for d in others if is_floating(d)])

    def get(self, name: str):
        return self.reference.get(name)

    def close(self) -> None:
        pass


def merge_segments(segments: Sequence[Segment], add: Callable[[str, np.ndarray], None], *, layout, mesh,
                   max_group_bytes: int | None, block_bytes: int | None, on_chunk=None,
                   compute_dtype: str | None = None) -> dict[str, int]:
    """Stream every segment into the sink; returns the tensors per engine path over all of them.

    compute_dtype: the config's `dtype` (inputs rounded to it, `drm_jax.engine.merge.merge`)."""
    counts: Counter = Counter()
    for seg in segments:
        params = dict(seg.params)
        if compute_dtype is not None:
            params["compute_dtype"] = compute_dtype
        extra = {"leaf_params": seg.leaf_params} if seg.leaf_params else {}
        counts.update(stream_merge(seg.sources, add, method=seg.method, params=params, layout=layout, mesh=mesh,
                                   max_group_bytes=max_group_bytes, block_bytes=block_bytes, on_chunk=on_chunk,
                                   **extra))
    return dict(counts)


def edit_model_config(config_path: Path, edit: Callable[[dict], None]) -> None:
    """Apply `edit` to the output's config.json (a JSON object) and write it back; a missing, unreadable
    or non-object file is left as it is (it was copied as it is: not ours to repair)."""
    model_config = json_object_or_none(config_path) if config_path.is_file() else None
    if model_config is None:
        return
    edit(model_config)
    config_path.write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def set_layer_count(config_path: Path, updates: Mapping[str, Any] | None) -> None:
    """Write a frankenmerge's layer counts (mergekit: num_layers_config_key) and per-layer lists into the
    output's config.json; a dotted key ("text_config.num_hidden_layers") goes into its nested mapping."""
    def edit(model_config: dict) -> None:
        for key, value in updates.items():
            *parents, leaf = key.split(".")
            target = model_config
            for part in parents:
                if not isinstance(target.get(part), dict):
                    target[part] = {}
                target = target[part]
            target[leaf] = value

    if updates:
        edit_model_config(config_path, edit)


__all__ = ["TensorParams", "bind_segments", "check_patterns", "check_segments", "edit_model_config",
           "gradient_key", "input_views", "layer_counts", "layer_positions", "merge_segments", "per_tensor_params",
           "require_layer_naming", "segment_sources", "set_layer_count"]
