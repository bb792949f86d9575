"""A config's merge plan: one immutable value made from the checked config and the checkpoints' headers,
opening no file (`plan_config`).

Planning and running are two steps. First the inputs are opened and their headers read (`read_headers`: per
model, the tensor names, shapes and dtypes under Hugging Face names, and its config.json as text); then
`plan_config(config, headers)` checks them against each other and against the config and returns a
`ConfigPlan`: the segments (`drm_jax.config.segments`: one for a `models` config; for a `slices` config the
tensors before the layers, each slice and the tensors after the layers), each with its output tensors
(names, shapes, dtypes, engine roles), every input's own name of each, its method, engine parameters and
per-tensor `leaf_params`; the output dtype and the frankenmerge's config.json updates; the output vocabulary
where the config builds one (`drm_jax.config.vocabulary.VocabularyPlan`, frozen too, planned here from the
tokenizers' data, which `drm_jax.config.vocabulary.read_tokenizers` reads beforehand as the headers are
read). The merge then builds the output tokenizer (`drm_jax.config.vocabulary.build_tokenizer`), binds the
plan to the open readers (`drm_jax.config.segments.bind_segments`) and streams its segments; a dry run
describes it from the headers alone.

An input given as a LoRA adapter (a PEFT directory over the base, mergekit's `model+adapter`) is opened
as the adapted model (`drm_jax.config.streaming`), so its header is the adapted model's: the plan needs
nothing of its own for it. `--adapter-out` (`drm_jax.config.adapter_out`) is not planned here.

A reader that cannot tell a tensor's shape or dtype, or a config.json that cannot be read, is recorded
as such in the headers: the plan raises that error where it asks for the value, as the merge did when
it asked the reader.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from drm_jax import arch as arch_data
from drm_jax.config.recipe import Recipe, build_recipe
from drm_jax.config.schema import MergeConfig, ModelEntry
from drm_jax.config.segment_defs import SegmentDef, base_policy, models_def, needs_segments, representative, slice_def
from drm_jax.config.segments import (TensorParams, check_patterns, gradient_key, input_views, layer_counts,
                                     layer_positions, per_tensor_params, require_layer_naming, segment_sources)
from drm_jax.config.vocabulary import Tokenizers, VocabularyPlan, plan_vocabulary
from drm_jax.errors import CheckpointError, quote
from drm_jax.io import architectures as arch_lib
from drm_jax.io import naming
from drm_jax.io.dtypes import dtype_from_name
from drm_jax.methods.registry import get_method


# -- the headers ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Failure:
    """What a reader raised when asked for a value; raised again where the plan asks for it."""

    kind: type
    args: tuple

    def throw(self):
        raise self.kind(*self.args)


@dataclass(frozen=True)
class ModelHeader:
    """One opened input as the planner sees it: `model` its config reference; its tensors (Hugging Face
    names) with their shapes and dtypes (a `Failure` where the reader could not tell); how errors name it
    (`path`), its format and config folder; `model_config` its config.json as JSON text (None: none, a
    `Failure`: unreadable)."""

    model: str
    names: tuple[str, ...]
    shapes: tuple[Any, ...]
    dtypes: tuple[Any, ...]
    path: Any = None
    format: str = "hf"
    config_dir: Path | None = None
    model_config: Any = None

    def config(self) -> dict | None:
        """config.json as a new dict (None without one); raises what reading it raised."""
        if isinstance(self.model_config, Failure):
            self.model_config.throw()
        return None if self.model_config is None else json.loads(self.model_config)


@dataclass(frozen=True)
class Headers:
    """The headers of a merge's inputs, in the order they were opened (`input_entries`), and the
    architecture name their config.json (or names) gave."""

    arch: str
    models: tuple[ModelHeader, ...]

    def of(self, model: str) -> ModelHeader:
        return next(h for h in self.models if h.model == model)


def _asked(ask: Callable[[], Any]) -> Any:
    try:
        return ask()
    except Exception as err:  # a reader's own failure: raised again if the plan asks for this value
        return Failure(type(err), err.args)


def read_headers(refs: Sequence[str], views: Sequence[Any], arch: str) -> Headers:
    """The headers of open views (`drm_jax.config.streaming.open_views`; `refs[i]` is the config reference
    of `views[i]`): reads no tensor data."""
    models = []
    for ref, view in zip(refs, views):
        names = tuple(view.keys())
        config = _asked(lambda v=view: naming.read_model_config(v))
        models.append(ModelHeader(
            ref, names, tuple(_asked(lambda n=n: tuple(view.shape(n))) for n in names),
            tuple(_asked(lambda n=n: np.dtype(view.dtype(n))) for n in names), getattr(view, "path", None),
            getattr(view, "format", "hf"), getattr(view, "config_dir", None),
            config if isinstance(config, Failure) or config is None else json.dumps(config)))
    return Headers(arch, tuple(models))


class HeaderView:
    """A view with a header's names, shapes and dtypes and no data: what the plan checks and a dry run
    describes."""

    def __init__(self, header: ModelHeader):
        self.header = header
        self.format, self.path, self.config_dir = header.format, header.path, header.config_dir
        self._index = {n: i for i, n in enumerate(header.names)}

    def keys(self) -> list[str]:
        return list(self.header.names)

    def _value(self, values: tuple, name: str):
        if name not in self._index:
            raise CheckpointError(f"{self.path}: no tensor named {quote(name)}")
        value = values[self._index[name]]
        if isinstance(value, Failure):
            value.throw()
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        return self._value(self.header.shapes, name)

    def dtype(self, name: str) -> np.dtype:
        return self._value(self.header.dtypes, name)

    def get(self, name: str):
        raise CheckpointError(f"{self.path}: tensor {quote(name)}: a plan reads no tensor data")

    def close(self) -> None:
        pass


def header_views(headers: Headers) -> list[HeaderView]:
    return [HeaderView(h) for h in headers.models]


def input_entries(config: MergeConfig, recipe: Recipe) -> tuple[ModelEntry, ...]:
    """The inputs a merge opens, in order: the reference, then the merged models (a `models` config); every
    model of the slices (a `slices` config)."""
    return tuple(config.models) if config.slices else (recipe.reference, *recipe.models)


# -- the plan ---------------------------------------------------------------------------------------------
def _frozen_value(value: Any) -> Any:
    """A parameter's value with its lists (per-model values, gradients) as tuples, nested ones too."""
    if type(value) in (list, tuple):  # not a named tuple
        return tuple(_frozen_value(v) for v in value)
    return value


def frozen_params(mapping: Mapping | None) -> Mapping | None:
    """A read-only copy of a mapping of parameters, its list values as tuples (`_frozen_value`)."""
    return None if mapping is None else MappingProxyType({k: _frozen_value(v) for k, v in mapping.items()})


@dataclass(frozen=True)
class SegmentPlan:
    """One streamed merge of the plan.

    key: how errors and the dry run name it. method: the registry name. reference / models: the config
    references of its reference (the output's names, shapes and dtypes) and its merged models; labels:
    how errors name them. in_names: {model reference: its own name of each output tensor}, or None where
    the inputs are read under the output names (a `models` config). role_kwargs, zero_base, exact_roles:
    the recipe's (`drm_jax.config.recipe.Recipe`). promote: floating outputs take the promoted dtype of
    the inputs (neither dtype nor out_dtype given). names, shapes, dtypes, roles: the output tensors, as
    the engine sees them (dtypes before the cast to out_dtype). params: the engine parameters;
    leaf_params: {tensor: {traced parameter: value}} where a tensor's differ, or None.
    """

    key: str
    method: str
    reference: str
    reference_label: str
    models: tuple[str, ...]
    labels: tuple[str, ...]
    role_kwargs: Mapping[str, Any]
    zero_base: bool
    exact_roles: frozenset
    promote: bool
    in_names: Mapping[str, tuple[str, ...]] | None = None
    names: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    dtypes: tuple[np.dtype, ...] = ()
    roles: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    leaf_params: Mapping[str, Mapping[str, Any]] | None = None

    def merged(self) -> list[bool]:
        """Per output tensor: whether it goes through a merge path."""
        return [role in ("matrix", "other") for role in self.roles]


@dataclass(frozen=True)
class ConfigPlan:
    """What a config's merge does, decided before any tensor is read.

    kind: "models" or "slices". arch: the architecture name. entries: the inputs' config references in
    the order they are opened (`input_entries`). segments: the streamed merges, in output order.
    reference: the input whose config.json, tokenizer and writer format the output takes. out_dtype: the
    written floating dtype's name (None: each tensor's own), cast: the config's `dtype` (inputs are cast
    to it). layer_updates: the output config.json's {dotted key: value} of a frankenmerge, else None.
    vocabulary: the output vocabulary (`drm_jax.config.vocabulary.VocabularyPlan`) or None.
    """

    kind: str
    arch: str
    entries: tuple[str, ...]
    segments: tuple[SegmentPlan, ...]
    reference: str
    out_dtype: str | None
    cast: str | None
    layer_updates: Mapping[str, Any] | None = None
    vocabulary: VocabularyPlan | None = None

    @property
    def out_numpy_dtype(self) -> np.dtype | None:
        return None if self.out_dtype is None else dtype_from_name(self.out_dtype)

    @property
    def cast_dtype(self) -> np.dtype | None:
        return None if self.cast is None else dtype_from_name(self.cast)


def _planned(draft: SegmentPlan, sources, params: Mapping, leaf: Mapping | None) -> SegmentPlan:
    info = sources.info
    return dataclasses.replace(
        draft, names=tuple(info.names), shapes=tuple(tuple(s) for s in info.shapes),
        dtypes=tuple(np.dtype(d) for d in info.dtypes), roles=tuple(sources.roles), params=frozen_params(params),
        leaf_params=None if leaf is None else MappingProxyType({k: frozen_params(v) for k, v in leaf.items()}))


def plan_config(config: MergeConfig, headers: Headers, *, recipe: Recipe | None = None,
                tokenizers: Tokenizers | None = None) -> ConfigPlan:
    """The merge plan of a checked config over its inputs' headers (`read_headers`); opens no file.

    tokenizers: the data of the inputs' tokenizers (`drm_jax.config.vocabulary.read_tokenizers`), needed when
    the config has a tokenizer source or block: the output vocabulary is planned from it
    (`drm_jax.config.vocabulary.plan_vocabulary`) and the vocabulary tensors with the output's rows.

    Raises the errors the merge raises before reading any tensor: a vocabulary the config leaves undefined,
    a tensor missing from a model or of another shape or kind of dtype, a slice's missing layer, a
    per-tensor value that does not translate, a pattern that matches no tensor (ConfigError,
    CheckpointError, MergeInputError).
    """
    recipe = recipe or build_recipe(config)
    vocabulary = None
    if config.tokenizer_spec is not None:
        if tokenizers is None:
            raise ValueError("plan_config: the config builds an output vocabulary; pass its tokenizers "
                             "(drm_jax.config.vocabulary.read_tokenizers)")
        vocabulary = plan_vocabulary(config, tokenizers)
    out_dtype = config.out_dtype or config.dtype
    promote = config.dtype is None and config.out_dtype is None
    entries = tuple(h.model for h in headers.models)
    cast = None if config.dtype is None else dtype_from_name(config.dtype)
    views = input_views(entries, header_views(headers), vocabulary, cast)
    out = None if out_dtype is None else dtype_from_name(out_dtype)
    arch = headers.arch
    if not config.slices:
        segment, updates = _models_segment(config, recipe, headers, views, out, promote), None
        segments = (segment,)
        reference = entries[0]
    else:
        segments, reference, updates = _slice_segments(config, headers, dict(zip(entries, views)), out, promote)
    check_patterns(segments)
    return ConfigPlan("slices" if config.slices else "models", arch, entries, tuple(segments), reference,
                      out_dtype, config.dtype, None if updates is None else frozen_params(updates), vocabulary)


def _models_segment(config: MergeConfig, recipe: Recipe, headers: Headers, views: list, out_dtype,
                    promote: bool) -> SegmentPlan:
    draft = SegmentPlan("models", recipe.method, recipe.reference.model,
                        f"{recipe.reference.key} ({recipe.reference.model})", tuple(m.model for m in recipe.models),
                        tuple(f"{e.key} ({e.model})" for e in recipe.models), frozen_params(recipe.role_kwargs),
                        recipe.zero_base, frozenset(recipe.exact_roles), promote)
    sources = segment_sources(draft, views[0], views[1:], out_dtype)
    params, leaf = recipe.engine_kwargs, None
    seg = models_def(config)
    if needs_segments(config):
        arch = headers.arch
        reference = headers.models[0]
        names = sources.info.names
        grad = gradient_key(seg)
        if grad is not None:
            require_layer_naming(arch, grad, reference.config)
        ts = layer_positions(arch, names, layer_counts(arch, reference.config, names))
        ins = [names for _ in seg.sources]
        params, leaf = per_tensor_params(TensorParams(config, seg), names, ins, ts,
                                         [role in ("matrix", "other") for role in sources.roles])
    return _planned(draft, sources, params, leaf)


def _reference_of(seg: SegmentDef) -> ModelEntry:
    if base_policy(get_method(seg.method)) != "input" and seg.base_model is not None:
        return next(m for m in seg.sources if m.model == seg.base_model)
    return seg.sources[0]


def _slice_segment(config: MergeConfig, seg: SegmentDef, views: Mapping[str, Any], own: Mapping[str, list[str]],
                   out_names: list[str], ts: list[float], out_dtype, promote: bool) -> SegmentPlan:
    """A segment of a `slices` config: `own[model]` lists, per output tensor, the model's own name."""
    recipe = build_recipe(representative(config, seg))
    by_model = {m.model: m for m in seg.sources}

    def check(ref: str) -> None:
        entry = by_model[ref]
        present = set(views[ref].keys())
        for out, name in zip(out_names, own[ref]):
            if name not in present:
                raise CheckpointError(f"{entry.key}: tensor {name!r} (output {out!r}) is missing from "
                                      f"{entry.model}" + (f" (layer_range {list(entry.layer_range)})"
                                                          if entry.layer_range else ""))

    reference = recipe.reference.model
    for m in recipe.models:
        check(m.model)
    check(reference)
    draft = SegmentPlan(seg.key, seg.method, reference, f"{by_model[reference].key} ({reference})",
                        tuple(m.model for m in recipe.models),
                        tuple(f"{by_model[m.model].key} ({m.model})" for m in recipe.models),
                        frozen_params(recipe.role_kwargs), recipe.zero_base, frozenset(recipe.exact_roles), promote,
                        MappingProxyType({m: tuple(own[m]) for m in own}), tuple(out_names))
    sources = segment_sources(draft, views[reference], [views[m.model] for m in recipe.models], out_dtype)
    params, leaf = per_tensor_params(TensorParams(config, seg), out_names, [own[m.model] for m in seg.sources], ts,
                                     [role in ("matrix", "other") for role in sources.roles])
    return _planned(draft, sources, params, leaf)


def _slice_segments(config: MergeConfig, headers: Headers, views: Mapping[str, Any], out_dtype, promote: bool
                    ) -> tuple[list[SegmentPlan], str, dict[str, Any]]:
    arch = headers.arch
    key = "slices" if not config.module_parameters else "modules.default.slices"
    slices = config.slices
    segments: list[SegmentPlan] = []

    def add(seg: SegmentDef, out_names: list[str], own: dict[str, list[str]], ts: list[float]) -> None:
        if out_names:
            segments.append(_slice_segment(config, seg, views, own, out_names, ts, out_dtype, promote))

    # tensors before the layers: the first slice's sources (mergekit: pre_weights)
    first = slice_def(config, slices[0])
    reference = _reference_of(first).model
    ref_view = views[reference]
    row = require_layer_naming(arch, key, headers.of(reference).config)
    outside = [n for n in ref_view.keys() if arch_lib.layer_index(arch, n) is None]
    before = [n for n in outside if arch_lib.before_layers(arch, n)]
    add(dataclasses.replace(first, key=f"{first.key} (tensors before the layers)"), before,
        {m.model: list(before) for m in first.sources}, [0.0] * len(before))
    out_layer = 0
    origins: dict[str, list[tuple[str, int]]] = {}  # {stack name: (model, layer) of each output layer}
    for s in slices:
        seg = slice_def(config, s)
        ref = _reference_of(seg)
        n = s.num_layers
        out_names: list[str] = []
        own: dict[str, list[str]] = {m.model: [] for m in seg.sources}
        ts: list[float] = []
        # {stack name: {layer index: the reference's tensor names}}
        positions: dict[str, dict[int, list[str]]] = {}
        for name in views[ref.model].keys():
            stack = arch_lib.layer_stack(arch, name)
            if stack is not None:
                positions.setdefault(stack.name, {}).setdefault(arch_lib.layer_index(arch, name), []).append(name)
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            layer = ref.layer_range[0] + offset
            layer_names = []
            for stack_name in positions or [""]:  # a reference without layers: "has no layer"
                if layer not in positions.get(stack_name, {}):
                    where = f" in its {stack_name} stack" if len(positions) > 1 else ""
                    raise CheckpointError(f"{ref.key}.layer_range: {ref.model} has no layer {layer}{where} "
                                          f"(layer_range {list(ref.layer_range)})")
                layer_names += positions[stack_name][layer]
                origins.setdefault(stack_name, []).append((ref.model, layer))
            for name in layer_names:
                out_names.append(arch_lib.with_layer_index(arch, name, out_layer + offset))
                for m in seg.sources:
                    own[m.model].append(arch_lib.with_layer_index(arch, name, m.layer_range[0] + offset))
                ts.append(t)
        add(seg, out_names, own, ts)
        out_layer += n
    # tensors after the layers: the last slice's sources (mergekit: post_weights, as many sources as the
    # first slice has)
    last = slice_def(config, slices[-1])
    last = dataclasses.replace(last, key=f"{last.key} (tensors after the layers)",
                               sources=last.sources[:len(first.sources)])
    ref_view = views[_reference_of(last).model]
    after = [n for n in ref_view.keys()
             if arch_lib.layer_index(arch, n) is None and not arch_lib.before_layers(arch, n)]
    add(last, after, {m.model: list(after) for m in last.sources}, [0.0] * len(after))
    return segments, reference, _config_updates(row, headers, reference, origins)


def _config_updates(row: arch_data.Architecture, headers: Headers, reference: str,
                    origins: Mapping[str, Sequence[tuple[str, int]]]) -> dict[str, Any]:
    """{dotted config.json key: value} of a frankenmerge: each stack's layer count, and each per-layer list
    (`layer_types`) made of the entries of the layers taken, from their own model's config.json (left as
    it is where a model lacks the list)."""
    configs: dict[str, dict] = {}

    def config_of(model: str) -> dict:
        if model not in configs:
            configs[model] = headers.of(model).config() or {}
        return configs[model]

    updates: dict[str, Any] = {}
    own = headers.of(reference).config() or {}
    for stack in row.stacks:
        origin = origins.get(stack.name)
        if not origin:
            continue
        updates[arch_lib.num_layers_key(stack, own)] = len(origin)
        for key in stack.per_layer_keys:
            lists = [arch_lib.config_value(config_of(model), key) for model, _ in origin]
            if all(isinstance(v, list) and layer < len(v) for v, (_, layer) in zip(lists, origin)):
                updates[key] = tuple(v[layer] for v, (_, layer) in zip(lists, origin))
    return updates


__all__ = ["ConfigPlan", "Headers", "SegmentPlan", "frozen_params", "header_views", "input_entries",
           "plan_config", "read_headers"]
