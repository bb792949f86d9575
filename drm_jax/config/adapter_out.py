"""LoRA adapters of one base model merged into one adapter (`drm-jax merge CONFIG OUT_DIR --adapter-out`,
`drm_jax.merge_config(..., adapter_out=True)`).

Every merged model of the config must be a PEFT LoRA adapter of `base_model`: an adapter directory (applied
over base_model) or mergekit's `base_model+adapter` form. They are merged by `drm_jax.merge_adapters` with
the config's method and parameters (the same recipe as a model merge), in factored form where the method
allows (docs/methods.md#lora-factored), and OUT_DIR becomes a PEFT adapter directory (adapter_config.json,
adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base, OUT_DIR)` loads. `--adapter-rank R`
sets its rank (default K r: exact where the merge factors; the discarded energy is returned otherwise).
Without --adapter-out the same config writes the merged model (base + merged delta) instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from drm_jax.config.merge import check_output, python_warning
from drm_jax.config.recipe import Recipe
from drm_jax.config.schema import MergeConfig
from drm_jax.config.streaming import PEFT_CONFIG_NAME, input_paths, split_adapter
from drm_jax.engine.adapters import adapter_method_problem
from drm_jax.engine.adapters import merge_adapters
from drm_jax.engine.prepare import rules_for
from drm_jax.errors import ConfigError, os_errors_named
from drm_jax.io import naming
from drm_jax.io.detect import open_checkpoint
from drm_jax.io.dtypes import dtype_from_name
from drm_jax.io.peft_io import PeftReader, write_lora_adapter
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


def merge_to_adapter(config: MergeConfig, out_dir: Path, *, recipe: Recipe, force: bool = False,
                     rank: int | None = None, warn: Callable[[str], None] = python_warning) -> dict[str, Any]:
    """Merge the config's adapters into one PEFT adapter at `out_dir`; returns {"output": Path, "rank": int,
    "weights": number of adapted weights, "discarded": {weight: discarded energy}, "paths": {weight:
    "factored" | "concatenated" | "dense"}}. Nothing is left at `out_dir` on failure. `warn` receives the notes of
    the merge (a rank cut that discards more than 1% of a weight's energy)."""
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
        arch = naming.architecture_of([base])
        flags = {bool(r.config.get("fan_in_fan_out")) for r in adapters}
        if len(flags) > 1:
            raise _fail(config, "the adapters disagree on fan_in_fan_out")
        readers = iter(adapters)
        weights = [{} if path is None else next(readers).lora_weights() for path in adapter_dirs]
        adapted = {n for w in weights for n in w}
        # every leaf of the base (TIES' whole-model trim counts the ones no adapter changes), adapted ones float32
        shapes = {n: jax.ShapeDtypeStruct(tuple(base.shape(n)), np.float32 if n in adapted else base.dtype(n))
                  for n in base.keys()}
        embeddings = {n for r in adapters for n in r.keys() if r.is_embedding(n)}
        task_type = adapters[0].config.get("task_type")
        base_name = adapters[0].config.get("base_model_name_or_path") or str(base_path)
    finally:
        for reader in adapters:
            reader.close()  # the adapter's files; the base is closed below
        base.close()
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        result = merge_adapters(shapes, weights, method=recipe.method, rank=rank, layout=naming.layout_for(arch),
                                **recipe.role_kwargs, **recipe.engine_kwargs)
    for note in notes:
        warn(str(note.message))
    dtype = dtype_from_name(config.out_dtype or config.dtype or "float32")
    with os_errors_named(out_dir):
        output = write_lora_adapter(out_dir, {n: (w.b, w.a, w.transposed) for n, w in result.adapter.items()},
                                    embeddings=embeddings, fan_in_fan_out=flags.pop() if flags else False,
                                    base_model_name_or_path=base_name, task_type=task_type, dtype=dtype,
                                    overwrite=force)
    out_rank = max(int(np.shape(w.b)[1]) for w in result.adapter.values()) if result.adapter else 0
    return {"output": Path(output), "rank": out_rank, "weights": len(result.adapter), "discarded": result.discarded,
            "paths": result.paths}


__all__ = ["merge_to_adapter"]
