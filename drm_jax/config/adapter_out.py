"""LoRA adapters of one base model merged into one adapter (`drm-jax merge CONFIG OUT_DIR --adapter-out`,
`drm_jax.merge_config(..., adapter_out=True)`).

Every merged model of the config must be a PEFT LoRA adapter of `base_model`: an adapter directory (applied
over base_model) or mergekit's `base_model+adapter` form. They are merged by `drm_jax.merge_adapters` with
the config's method and parameters (the same recipe as a model merge), in factored form where the method
allows (docs/methods.md#lora-factored), and OUT_DIR becomes a PEFT adapter directory (adapter_config.json,
adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base, OUT_DIR)` loads. `--adapter-rank R`
sets its rank (default K r: exact where the merge factors; the discarded energy is returned otherwise).
Without --adapter-out the same config writes the merged model (base + merged delta) instead.

As a model merge, it is planned, then run: the base and the adapters are opened and their headers read
(`read_adapter_headers`: the base's tensors, each adapter's adapted weights, embeddings and config);
`plan_adapter` turns them into one frozen `AdapterPlan` (the leaves the merge sees, which are adapted,
which are embeddings, fan_in_fan_out, the written config's fields), opening no file; then the LoRA factors
are read and merged.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import numpy as np

from drm_jax.config.merge import check_output, python_warning
from drm_jax.config.plan import frozen_params
from drm_jax.config.recipe import Recipe
from drm_jax.config.schema import MergeConfig
from drm_jax.config.streaming import PEFT_CONFIG_NAME, input_paths, split_adapter
from drm_jax.engine.adapters import adapter_method_problem
from drm_jax.engine.adapters import merge_adapters
from drm_jax.engine.prepare import rules_for
from drm_jax.errors import CheckpointError, ConfigError, os_errors_named
from drm_jax.io import naming
from drm_jax.io.detect import open_checkpoint
from drm_jax.io.dtypes import dtype_from_name
from drm_jax.io.peft_io import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PeftReader, check_lora_factors,
                                write_lora_adapter)
from drm_jax.methods.registry import get_method, static_values


def _fail(config: MergeConfig, message: str) -> ConfigError:
    return ConfigError((f"{config.source}: " if config.source is not None else "") + f"--adapter-out: {message}")


def adapter_paths(config: MergeConfig, recipe: Recipe) -> tuple[Path, list[Path | None]]:
    """(base model path, the merged adapters' directories), or ConfigError naming the entry that is not a
    LoRA adapter of the base model. The base model itself among the merged models (a `linear` merge
    averages it with the others) is None: an adapter that changes nothing."""
    if getattr(config, "slices", ()):
        raise _fail(config, "a slices config merges layer ranges of models; give the adapters under models")
    if getattr(config, "tokenizer_spec", None) is not None:
        raise _fail(config, "tokenizer_source / tokenizer change the vocabulary, which an adapter cannot carry")
    if config.base_model is None:
        raise _fail(config, "base_model must be the model the adapters were trained on")
    base, base_adapter = split_adapter(config, config.base_model)
    if base_adapter is not None:
        raise _fail(config, "base_model must be a model, not a model+adapter")
    adapters = []
    for entry in recipe.models:
        model, adapter = split_adapter(config, entry.model)
        if adapter is None and model.expanduser().resolve() == base.expanduser().resolve():
            adapters.append(None)
            continue
        if adapter is None:
            model, adapter = base, model
        elif model.expanduser().resolve() != base.expanduser().resolve():
            raise _fail(config, f"{entry.key}: {entry.model!r} is an adapter over another model than base_model")
        if not (adapter / PEFT_CONFIG_NAME).is_file():
            raise _fail(config, f"{entry.key}: {str(adapter)!r} is not a PEFT LoRA adapter directory "
                                f"({PEFT_CONFIG_NAME} missing)")
        adapters.append(adapter)
    if all(a is None for a in adapters):
        raise _fail(config, "no LoRA adapter among the merged models")
    return base, adapters


@dataclass(frozen=True)
class AdapterHeader:
    """One LoRA adapter as the planner sees it: its adapted base weights (in its order), which of them are
    embeddings, its adapter_config.json as JSON text, and, per adapted weight, (name, kind, key, A's shape,
    B's shape) from its weights file's header (`drm_jax.io.peft_io.PeftReader.factors`); how errors name it
    (`path`) and its weights file (`file`)."""

    names: tuple[str, ...]
    embeddings: frozenset
    config: str
    factors: tuple[tuple[str, str, str, tuple[int, ...], tuple[int, ...]], ...] = ()
    path: str = ""
    file: str = ""

    def setting(self, key: str) -> Any:
        return json.loads(self.config).get(key)


@dataclass(frozen=True)
class AdapterHeaders:
    """The base model's tensors (names, shapes, dtypes) and architecture, and the header of each
    merged model that is an adapter (None: the base itself among the merged models)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    arch: str
    adapters: tuple[AdapterHeader | None, ...]


def read_adapter_headers(base: Any, readers: list[Any]) -> AdapterHeaders:
    """The headers of the open base reader and of the adapters' `PeftReader`s (None where a merged model is the
    base itself); reads no tensor data."""
    names = tuple(base.keys())
    adapters = tuple(None if r is None else AdapterHeader(
        tuple(r.keys()), frozenset(filter(r.is_embedding, r.keys())), json.dumps(r.config),
        tuple((n, kind, key, a, b) for n, (kind, key, a, b) in r.factors().items()), str(r.path),
        str(r.adapter.path)) for r in readers)
    shapes = tuple(tuple(base.shape(n)) for n in names)
    dtypes = tuple(np.dtype(base.dtype(n)) for n in names)
    return AdapterHeaders(names, shapes, dtypes, naming.architecture_of([base]), adapters)


@dataclass(frozen=True)
class AdapterPlan:
    """What an --adapter-out merge does: `leaves` (name, shape, dtype) the merge sees (every leaf of the base,
    the adapted ones float32: TIES' whole-model trim counts the ones no adapter changes), the `embeddings`,
    `fan_in_fan_out`, the `task_type` and `base_model_name_or_path` written, the architecture, the method,
    its role and engine parameters (the recipe's), the rank (None: K r) and the written dtype; `ranks`:
    per adapted weight, in the base's order, each merged model's rank of it (0: it does not adapt it; the
    base itself among the merged models adapts nothing)."""

    leaves: tuple[tuple[str, tuple[int, ...], np.dtype], ...]
    embeddings: frozenset
    fan_in_fan_out: bool
    task_type: Any
    base_name: str
    arch: str
    method: str
    role_kwargs: Mapping[str, Any]
    engine_kwargs: Mapping[str, Any]
    rank: int | None
    out_dtype: str
    ranks: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))

    def out_rank(self, name: str) -> int:
        """The merged adapter's rank of weight `name`: --adapter-rank, else K r (K merged models, r the
        largest rank of the weight among them)."""
        ranks = self.ranks[name]
        return self.rank if self.rank is not None else len(ranks) * max(ranks)


def _check_factors(adapter: AdapterHeader, base_shapes: Mapping[str, tuple[int, ...]], fan_in_fan_out: bool) -> None:
    """Each adapted weight of `adapter` has LoRA factors (no bias, no tensor saved whole), 2-D and of one
    rank, whose update has the base weight's shape (stored transposed for embeddings and fan_in_fan_out)."""
    for name, kind, key, a, b in adapter.factors:
        check_lora_factors(adapter.path, adapter.file, name, kind, key, a, b)
        stored = (b[0], a[1])
        if name in adapter.embeddings or fan_in_fan_out:
            stored = stored[::-1]
        if stored != tuple(base_shapes[name]):
            raise CheckpointError(f"{adapter.file}: module {key!r}: LoRA factors A {tuple(a)} and B {tuple(b)} make "
                                  f"an update of shape {stored}, but the base weight {name!r} has shape "
                                  f"{tuple(base_shapes[name])}")


def plan_adapter(config: MergeConfig, recipe: Recipe, base_path: Path, headers: AdapterHeaders,
                 rank: int | None = None) -> AdapterPlan:
    """The plan of an --adapter-out merge from its inputs' headers (`read_adapter_headers`); opens no file.
    Raises ConfigError for adapters that disagree on fan_in_fan_out or a rank past every adapted weight's
    smaller side, CheckpointError (naming the adapter's file and module) for a weight without LoRA factors
    or with factors that are not 2-D, of one rank and of the base weight's shape."""
    adapters = [a for a in headers.adapters if a is not None]
    flags = {bool(a.setting("fan_in_fan_out")) for a in adapters}
    if len(flags) > 1:
        raise _fail(config, "the adapters disagree on fan_in_fan_out")
    base_shapes = dict(zip(headers.names, headers.shapes))
    for adapter in adapters:
        _check_factors(adapter, base_shapes, bool(adapter.setting("fan_in_fan_out")))
    adapted = {n for a in adapters for n in a.names}
    own = [{n: int(a[0]) for n, _, _, a, _ in ([] if h is None else h.factors)} for h in headers.adapters]
    ranks = {n: tuple(r.get(n, 0) for r in own) for n in headers.names if n in adapted}
    largest = max((min(base_shapes[n]) for n in ranks), default=0)
    if rank is not None and ranks and rank > largest:
        raise _fail(config, f"--adapter-rank {rank} is larger than any adapted weight's rank can be (at most "
                            f"{largest}, the smaller side of the largest weight)")
    leaves = tuple((n, s, np.dtype(np.float32) if n in adapted else d)
                   for n, s, d in zip(headers.names, headers.shapes, headers.dtypes))
    first = adapters[0]
    return AdapterPlan(leaves, frozenset(n for a in adapters for n in a.embeddings), flags.pop() if flags else False,
                       first.setting("task_type"), first.setting("base_model_name_or_path") or str(base_path),
                       headers.arch, recipe.method, frozen_params(recipe.role_kwargs),
                       frozen_params(recipe.engine_kwargs), rank,
                       config.out_dtype or config.dtype or "float32", MappingProxyType(ranks))


def describe_adapter(plan: AdapterPlan) -> dict[str, Any]:
    """What an --adapter-out merge will write, from its plan (`merge_to_adapter(..., dry_run=True)`):
    {"adapter": True, "method", "models": merged models, "weights": [{"name", "ranks": each model's rank
    of it, "rank": the merged adapter's, "embedding"}], "rank": the written rank (the largest), "files":
    the files written, "dtype"}."""
    weights = [{"name": n, "ranks": list(r), "rank": plan.out_rank(n), "embedding": n in plan.embeddings}
               for n, r in plan.ranks.items()]
    return {"adapter": True, "method": plan.method, "models": len(next(iter(plan.ranks.values()), ())),
            "weights": weights, "rank": max((w["rank"] for w in weights), default=0),
            "files": [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME], "dtype": plan.out_dtype}


def merge_to_adapter(config: MergeConfig, out_dir: Path, *, recipe: Recipe, force: bool = False,
                     rank: int | None = None, warn: Callable[[str], None] = python_warning,
                     dry_run: bool = False) -> dict[str, Any]:
    """Merge the config's adapters into one PEFT adapter at `out_dir`; returns {"output": Path, "rank": int,
    "weights": number of adapted weights, "discarded": {weight: discarded energy}, "paths": {weight:
    "factored" | "concatenated" | "dense"}}. Nothing is left at `out_dir` on failure. `warn` receives the notes of
    the merge (a rank cut that discards more than 1% of a weight's energy).

    dry_run: stop after the plan (every check of the headers: the adapters, their factors' kinds and shapes)
    and return {"plan": `describe_adapter`'s dict, "output": Path}; no factor is read and nothing is written."""
    if rank is not None and rank < 1:
        raise _fail(config, f"--adapter-rank must be at least 1, got {rank}")
    spec = get_method(recipe.method)
    static = static_values(spec, {p.name: recipe.engine_kwargs[p.name] for p in spec.static
                                  if p.name in recipe.engine_kwargs})
    problem = adapter_method_problem(spec, rules_for(spec, static), whole_weights=recipe.zero_base)
    if problem is not None:
        raise _fail(config, problem)
    base_path, adapter_dirs = adapter_paths(config, recipe)
    check_output(Path(out_dir), force, input_paths(config, recipe.models) + [base_path])
    base = open_checkpoint(base_path)
    adapters: list[Any] = []
    try:
        if naming.naming_of(base) != "hf":
            raise _fail(config, f"base_model {str(base_path)!r} is a {base.format} checkpoint; the adapters' "
                                f"names are Hugging Face's (convert it with drm-jax convert first)")
        for path in adapter_dirs:
            if path is not None:
                adapters.append(PeftReader(path, base))
        readers = iter(adapters)
        plan = plan_adapter(config, recipe, base_path, read_adapter_headers(
            base, [None if path is None else next(readers) for path in adapter_dirs]), rank)
        if dry_run:
            return {"plan": describe_adapter(plan), "output": Path(out_dir)}
        readers = iter(adapters)
        weights = [{} if path is None else next(readers).lora_weights() for path in adapter_dirs]
    finally:
        for reader in adapters:
            reader.close()  # the adapter's files; the base is closed below
        base.close()
    shapes = {n: jax.ShapeDtypeStruct(shape, dtype) for n, shape, dtype in plan.leaves}
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        result = merge_adapters(shapes, weights, method=plan.method, rank=plan.rank,
                                layout=naming.layout_for(plan.arch), **plan.role_kwargs, **plan.engine_kwargs)
    for note in notes:
        warn(str(note.message))
    dtype = dtype_from_name(plan.out_dtype)
    with os_errors_named(out_dir):
        output = write_lora_adapter(out_dir, {n: (w.b, w.a, w.transposed) for n, w in result.adapter.items()},
                                    embeddings=plan.embeddings, fan_in_fan_out=plan.fan_in_fan_out,
                                    base_model_name_or_path=plan.base_name, task_type=plan.task_type, dtype=dtype,
                                    overwrite=force)
    out_rank = max(int(np.shape(w.b)[1]) for w in result.adapter.values()) if result.adapter else 0
    return {"output": Path(output), "rank": out_rank, "weights": len(result.adapter), "discarded": result.discarded,
            "paths": result.paths}


__all__ = ["describe_adapter", "merge_to_adapter"]
