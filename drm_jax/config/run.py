"""`drm_jax.merge_config`: run a mergekit config from Python exactly as `drm-jax merge` runs it (mergekit's
`run_merge` counterpart).

    import drm_jax
    drm_jax.merge_config("examples/configs/drm.yaml", "merged/")
    drm_jax.merge_config({"merge_method": "ties", "base_model": "/models/base", "models": [...]}, "out/",
                         max_memory="2GB", force=True)

The command line parses its flags into these keywords and prints what this returns and warns; the merge
itself, the checks and the files written are the same.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import yaml

from drm_jax.config.adapter_out import merge_to_adapter
from drm_jax.config.merge import (DEFAULT_MAX_MEMORY, check_output, merge_checkpoints, parse_kmb, parse_size,
                                  python_warning, select_devices)
from drm_jax.config.recipe import build_recipe
from drm_jax.config.schema import MergeConfig, config_from_yaml, load_config
from drm_jax.config.stages import plan_stages, stage_documents
from drm_jax.config.streaming import input_paths
from drm_jax.errors import ConfigError, os_errors_named
from drm_jax.methods.registry import get_method
from drm_jax.io.writer import refuse_overlap

_YAML_SUFFIXES = (".yml", ".yaml")


def read_config(config: str | os.PathLike | Mapping | MergeConfig) -> tuple[MergeConfig, Path | None]:
    """(the checked config, the file it was read from or None).

    config: a path (a `Path`, or a one-line string naming an existing file or ending in .yml / .yaml), YAML
      text (any other string), a dict in mergekit's schema, or a `MergeConfig`. Relative model paths are
      relative to the config file's folder, else to the working directory.
    """
    if isinstance(config, MergeConfig):
        return config, config.source
    if isinstance(config, Mapping):
        try:
            text = yaml.safe_dump(dict(config), sort_keys=False)
        except yaml.YAMLError as err:
            raise ConfigError(f"<config dict>: not a mergekit config (a value YAML cannot hold: "
                              f"{str(err).splitlines()[0][:120]})") from None
        return config_from_yaml(text), None
    if isinstance(config, os.PathLike) or (isinstance(config, str) and "\n" not in config
                                           and (config.endswith(_YAML_SUFFIXES) or Path(config).is_file())):
        return load_config(config), Path(config)
    if isinstance(config, str):
        return config_from_yaml(config), None
    raise ConfigError(f"config must be a path, YAML text, a dict or a MergeConfig, got {type(config).__name__}")


def with_random_seed(config: MergeConfig, seed: int | None, warn: Callable[[str], None]) -> MergeConfig:
    """The config with `seed` (mergekit's --random-seed) as its `parameters.seed` where it gives none and a
    method it runs draws at random (DARE, DELLA, ...: their `seed`); a note through `warn` otherwise."""
    if seed is None:
        return config
    if not 0 <= seed < 2**31:
        raise ConfigError(f"--random-seed: must be an integer from 0 to {2**31 - 1}, got {seed}")
    methods = {config.merge_method} | {s.merge_method for s in config.slices if s.merge_method is not None}
    random = sorted(m for m in methods if "seed" in get_method(m).names)
    given = [p for p in (config.parameters, config.module_parameters, *(s.parameters for s in config.slices))
             if "seed" in p]
    if not random:
        warn(f"--random-seed {seed}: method {', '.join(map(repr, sorted(methods)))} draws nothing at random; unused")
        return config
    if given:
        warn(f"--random-seed {seed}: the config's own parameters.seed is used")
        return config
    return dataclasses.replace(config, parameters={**config.parameters, "seed": seed})


def _bytes(value: int | str | None, parse: Callable[[str], int]) -> int | None:
    return parse(value) if isinstance(value, str) else value


def merge_config(config: str | os.PathLike | Mapping | MergeConfig, out_dir: str | os.PathLike, *,
                 force: bool = False, device: str | None = None, devices: int | Sequence | None = None,
                 max_memory: int | str = DEFAULT_MAX_MEMORY, max_shard_size: int | str | None = None,
                 out_shard_size: int | str | None = None, copy_tokenizer: bool = True,
                 write_model_card: bool = True, adapter_out: bool = False, adapter_rank: int | None = None,
                 intermediate_dir: str | os.PathLike | None = None, dry_run: bool = False,
                 progress: Callable[[int], ContextManager] | None = None,
                 warn: Callable[[str], None] = python_warning, random_seed: int | None = None,
                 hub_cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """Merge the models a mergekit config names into `out_dir`, streamed, as `drm-jax merge` does.

    Args (each mirrors the command line's flag of the same name):
      config: a path, YAML text, a dict or a `MergeConfig` (`read_config`). A file or text of several
        YAML documents is a multi-stage config (mergekit-multi's format, `drm_jax.config.stages`): its
        stages run in dependency order and the final one is written to `out_dir`.
      out_dir: the output folder (a Hugging Face safetensors checkpoint, or a PEFT adapter with
        `adapter_out`); written whole or not at all.
      force: replace `out_dir` (and a multi-stage config's intermediate outputs) if it exists and is not
        empty.
      device: "cpu", "gpu" or "tpu" (default: JAX's default device); sets JAX's default device.
      devices: how many local devices of that kind split the stacked layers (default: all), or the devices.
      max_memory: working-memory budget in bytes, or a size such as "1GB", "2GiB" (default "1GB").
      max_shard_size: largest output shard in bytes or a size (default: a tenth of max_memory).
      out_shard_size: mergekit's name and syntax for it ("5B": bytes of tensor data, 0: one file).
      copy_tokenizer: copy the reference model's tokenizer when the config builds none.
      write_model_card: write README.md and mergekit_config.yml.
      adapter_out: the models are LoRA adapters of base_model; write one merged PEFT adapter.
      adapter_rank: its rank (default K r); needs adapter_out.
      intermediate_dir: where a multi-stage config's named stages are written (`<dir>/<name>`, kept);
        default: a temporary folder beside `out_dir`, removed at the end.
      dry_run: check everything that needs no tensor data and return the plan; nothing is written
        (`drm_jax.config.merge.describe_plan`; with adapter_out `drm_jax.config.adapter_out.describe_adapter`).
      progress: progress(total) -> a context manager whose value has on_chunk(group, n_layers) (the
        command line's bar, `drm_jax.cli.progress.MergeProgress`); None: silent. Called once per stage.
      warn: receives each note for the user (default: a UserWarning).
      random_seed: the seed of the random methods (DARE, DELLA, ...) where the config gives none
        (mergekit's --random-seed; `with_random_seed`).
      hub_cache: the Hugging Face Hub cache that models named `org/name[@revision]` are found in (mergekit's
        --transformers-cache; default: HF_HUB_CACHE, else $HF_HOME/hub); see `drm_jax.io.hub`.

    Returns:
      {"counts": tensors per engine path, "output": Path}; with adapter_out `merge_to_adapter`'s dict;
      with dry_run {"plan": ..., "output": Path}; a multi-stage config adds "stages": one such dict per
      stage, in the order they ran, each with its "name".

    Raises:
      DrmJaxError (ConfigError, CheckpointError, MergeInputError), naming the key, file or tensor; nothing
      is left at `out_dir` and no input is modified.
    """
    options = dict(force=force, max_memory=_bytes(max_memory, parse_size),
                   max_shard_size=_bytes(max_shard_size, parse_size), out_shard_size=_bytes(out_shard_size, parse_kmb),
                   copy_tokenizer=copy_tokenizer, write_model_card=write_model_card, progress=progress, warn=warn,
                   dry_run=dry_run)
    staged = stage_documents(config)
    if staged is not None:
        if adapter_out or adapter_rank is not None:
            raise ConfigError("--adapter-out merges one config into an adapter; a multi-stage config writes models")
        if devices is None or isinstance(devices, int):
            devices = select_devices(device, devices)
        return _merge_stages(*staged, Path(out_dir), intermediate_dir, devices=list(devices), **options)
    config, config_file = read_config(config)
    config = with_random_seed(config, random_seed, warn)
    if hub_cache is not None:
        config = dataclasses.replace(config, hub_cache=str(hub_cache))
    out_dir = Path(out_dir)
    recipe = build_recipe(config)
    if intermediate_dir is not None:
        warn("--intermediate-dir: the config is a single merge (one YAML document without a name); "
             "nothing is written there")
    # The config file is an input too: force must never remove the folder holding it.
    check_output(out_dir, force, ([config_file] if config_file is not None else [])
                 + input_paths(config, config.models if config.slices else recipe.models)
                 + [config.resolve(recipe.reference.model)])
    if devices is None or isinstance(devices, int):
        devices = select_devices(device, devices)
    if adapter_out or adapter_rank is not None:
        if not adapter_out:
            raise ConfigError("--adapter-rank needs --adapter-out")
        return merge_to_adapter(config, out_dir, recipe=recipe, force=force, rank=adapter_rank, warn=warn,
                                dry_run=dry_run)
    return _merge_one(config, out_dir, recipe=recipe, devices=list(devices), **options)


def _merge_one(config: MergeConfig, out_dir: Path, **options) -> dict[str, Any]:
    with os_errors_named(out_dir):  # e.g. an unwritable output directory or a full disk
        return merge_checkpoints(config, out_dir, **options)


def _merge_stages(documents: list, source: Path | None, out_dir: Path, intermediate_dir, *, force: bool,
                  dry_run: bool, warn: Callable[[str], None], **options) -> dict[str, Any]:
    """Run a multi-stage config (`drm_jax.config.stages`): every stage planned and checked first, then run
    in order. A dry run checks every stage as the merge would: each stage's output is stood in for, in a
    temporary folder, by its header without data (`drm_jax.config.merge.write_stand_in`) for the stages
    that read it."""
    keep = intermediate_dir is not None
    if keep:
        intermediate = Path(intermediate_dir).expanduser()
        refuse_overlap(out_dir, [intermediate])
    else:  # beside the output, on its disk
        intermediate = out_dir.expanduser().absolute().parent / f".{out_dir.name}.stages"
    destinations = plan_stages(documents, source, out_dir, intermediate.absolute())
    for stage in destinations:
        inputs = [source] if source is not None and stage.final else []
        check_output(stage.out_dir, force, inputs + input_paths(stage.config, stage.config.models))
    for stage in destinations:
        if not stage.final and not any(stage.name in s.needs for s in destinations):
            warn(f"stage {stage.name!r} is used by no other stage" + (
                f"; its output is {stage.out_dir}" if keep else
                " and its output is discarded (pass --intermediate-dir to keep it)"))
    if dry_run:
        work = Path(tempfile.mkdtemp(prefix="drm-jax-dry-run-"))
    elif keep:
        work = intermediate
    else:
        intermediate.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stages-", dir=intermediate.parent))
    try:
        stages = destinations if work == intermediate else plan_stages(documents, source, out_dir, work.absolute())
        results = []
        for stage, destination in zip(stages, destinations):
            extra = {}
            if dry_run and not stage.final:
                stage.out_dir.mkdir(parents=True)
                extra["stand_in"] = stage.out_dir
            elif not dry_run:
                stage.out_dir.parent.mkdir(parents=True, exist_ok=True)
            result = _merge_one(stage.config, destination.out_dir if dry_run else stage.out_dir,
                                recipe=build_recipe(stage.config), force=force, dry_run=dry_run, warn=warn,
                                **options, **extra)
            results.append({"name": stage.name, **result, "output": destination.out_dir})
        final = next(r for r, s in zip(results, stages) if s.final)
        return {**final, "output": out_dir, "stages": results}
    finally:
        if work != intermediate:
            shutil.rmtree(work, ignore_errors=True)


__all__ = ["merge_config", "read_config"]
