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
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import yaml

from drm_jax.config.adapter_out import merge_to_adapter
from drm_jax.config.merge import (DEFAULT_MAX_MEMORY, check_output, merge_checkpoints, parse_kmb, parse_size,
                                  python_warning, select_devices)
from drm_jax.config.recipe import build_recipe
from drm_jax.config.schema import MergeConfig, config_from_yaml, load_config
from drm_jax.config.streaming import input_paths
from drm_jax.errors import CheckpointError, ConfigError, DrmJaxError
from drm_jax.methods.registry import get_method

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
                 progress: Callable[[int], ContextManager] | None = None,
                 warn: Callable[[str], None] = python_warning, random_seed: int | None = None,
                 hub_cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """Merge the models a mergekit config names into `out_dir`, streamed, as `drm-jax merge` does.

    Args (each mirrors the command line's flag of the same name):
      config: a path, YAML text, a dict or a `MergeConfig` (`read_config`).
      out_dir: the output folder (a Hugging Face safetensors checkpoint, or a PEFT adapter with
        `adapter_out`); written whole or not at all.
      force: replace `out_dir` if it exists and is not empty.
      device: "cpu", "gpu" or "tpu" (default: JAX's default device); sets JAX's default device.
      devices: how many local devices of that kind split the stacked layers (default: all), or the devices.
      max_memory: working-memory budget in bytes, or a size such as "1GB", "2GiB" (default "1GB").
      max_shard_size: largest output shard in bytes or a size (default: a tenth of max_memory).
      out_shard_size: mergekit's name and syntax for it ("5B": bytes of tensor data, 0: one file).
      copy_tokenizer: copy the reference model's tokenizer when the config builds none.
      write_model_card: write README.md and mergekit_config.yml.
      adapter_out: the models are LoRA adapters of base_model; write one merged PEFT adapter.
      adapter_rank: its rank (default K r); needs adapter_out.
      progress: progress(total) -> a context manager whose value has on_chunk(group, n_layers) (the
        command line's bar, `drm_jax.cli.progress.MergeProgress`); None: silent.
      warn: receives each note for the user (default: a UserWarning).
      random_seed: the seed of the random methods (DARE, DELLA, ...) where the config gives none
        (mergekit's --random-seed; `with_random_seed`).
      hub_cache: the Hugging Face Hub cache that models named `org/name[@revision]` are found in (mergekit's
        --transformers-cache; default: HF_HUB_CACHE, else $HF_HOME/hub); see `drm_jax.io.hub`.

    Returns:
      {"counts": tensors per engine path, "output": Path}; with adapter_out `merge_to_adapter`'s dict.

    Raises:
      DrmJaxError (ConfigError, CheckpointError, MergeInputError), naming the key, file or tensor; nothing
      is left at `out_dir` and no input is modified.
    """
    config, config_file = read_config(config)
    config = with_random_seed(config, random_seed, warn)
    if hub_cache is not None:
        config = dataclasses.replace(config, hub_cache=str(hub_cache))
    out_dir = Path(out_dir)
    recipe = build_recipe(config)
    # The config file is an input too: force must never remove the folder holding it.
    check_output(out_dir, force, ([config_file] if config_file is not None else [])
                 + input_paths(config, config.models if config.slices else recipe.models)
                 + [config.resolve(recipe.reference.model)])
    if devices is None or isinstance(devices, int):
        devices = select_devices(device, devices)
    if adapter_out or adapter_rank is not None:
        if not adapter_out:
            raise ConfigError("--adapter-rank needs --adapter-out")
        return merge_to_adapter(config, out_dir, recipe=recipe, force=force, rank=adapter_rank, warn=warn)
    try:
        return merge_checkpoints(config, out_dir, force=force, devices=list(devices),
                                 max_memory=_bytes(max_memory, parse_size),
                                 max_shard_size=_bytes(max_shard_size, parse_size), recipe=recipe,
                                 out_shard_size=_bytes(out_shard_size, parse_kmb), copy_tokenizer=copy_tokenizer,
                                 write_model_card=write_model_card, progress=progress, warn=warn)
    except OSError as err:
        if isinstance(err, DrmJaxError):
            raise
        # e.g. an unwritable output directory or a full disk: one line, no traceback
        raise CheckpointError(f"{err.filename or out_dir}: {err.strerror or err}") from None


__all__ = ["merge_config", "read_config", "with_random_seed"]
