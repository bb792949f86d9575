"""A checked mergekit config in, a merged checkpoint out, streamed (`drm_jax.merge_config`, `drm-jax merge`).

The config is checked first (`drm_jax.config.schema`), translated into engine arguments with mergekit's
semantics (`drm_jax.config.recipe`), the checkpoints are opened lazily (`drm_jax.config.streaming`), their
headers checked against each other and planned into one immutable value (`drm_jax.config.plan`), the plan
bound to the readers (`drm_jax.config.segments`), then `drm_jax.engine.merge.merge_leaves` merges one chunk
of one group of same-shaped tensors at a time, reading tensors on demand, and the writer flushes the output
shard by shard into a temporary directory that is renamed to OUT_DIR at the end. Peak memory is a few tensor
groups (bounded by `--max-memory`), not the models. Any failure leaves no OUT_DIR behind and never touches
the inputs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import jax
import numpy as np

from drm_jax.config.card import referenced_models, write_card_files
from drm_jax.config.chat_templates import resolve_chat_template
from drm_jax.config.recipe import Recipe, build_recipe
from drm_jax.config.schema import MergeConfig
from drm_jax.config.plan import ConfigPlan, Headers, SegmentPlan, header_views, input_entries, plan_config, read_headers
from drm_jax.config.segments import bind_segments, check_segments, edit_model_config, merge_segments, set_layer_count
from drm_jax.config.streaming import input_paths, open_views
from drm_jax.config.vocabulary import build_tokenizer, load_tokenizer, model_directory, read_tokenizers
from drm_jax.errors import CheckpointError, ConfigError, UnsafeFileError, quote
from drm_jax.io import naming
from drm_jax.io.base import CONFIG_FILE_NAMES
from drm_jax.io.dtypes import dtype_from_name, is_floating
from drm_jax.io.maxtext_io import writer_options
from drm_jax.io.model_files import TOKENIZER_FILES, copy_model_files
from drm_jax.io.safetensors_io import write_header_only
from drm_jax.io.writer import CheckpointWriter, check_dangling_link, check_replaceable, refuse_overlap
from drm_jax.methods.registry import get_method

DEFAULT_MAX_MEMORY = "1GB"
# Bytes of working memory per byte of stacked float32 inputs the engine accounts for in a chunk: the
# stacks themselves, the numpy tensors they were read from, and the method's intermediates (deltas,
# magnitudes, masks, the SVD's factors).
WORKSPACE_FACTOR = 10
# A tensor whose merge is elementwise is cut into row blocks of this fraction of a chunk's inputs: its
# whole inputs stay cached (they are read once), so the blocks themselves are kept small.
BLOCK_DIVISOR = 4
# Share of the memory budget one output shard may hold before it is flushed (safetensors serializes a
# shard into one buffer, so a shard costs about twice its size while it is written).
SHARD_SHARE = 10
# mergekit's "no limit": --out-shard-size 0 writes one file
UNLIMITED_SHARD = 2**62

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
HF_DTYPE_KEYS = ("torch_dtype", "dtype")
_KMB = re.compile(r"^(\d+)([kmb]?)$", re.IGNORECASE)
_KMB_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}
# Larger than any memory or file a size option can describe; sizes at or above it are refused.
MAX_SIZE = 2**62


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000, '2GiB' -> 2 * 2**30, '1234' or '1234B' -> 1234 bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"not a size: {text!r} (examples: 512MB, 2GiB, 1000000)")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise ConfigError(f"unknown size unit in {quote(text)}")
    size = number * _UNITS[unit]
    if not size < MAX_SIZE:  # a 400-digit number is inf as a float
        raise ConfigError(f"size {quote(text)} is larger than any memory or file (at most 2**62 bytes)")
    if int(size) <= 0:
        raise ConfigError(f"size must be positive: {quote(text)}")
    return int(size)


def parse_kmb(text: str) -> int:
    """mergekit's size syntax for --out-shard-size: an integer with an optional K / M / B suffix
    (thousand, million, billion): '5B' -> 5_000_000_000, '500M', '1000'. 0 means no limit."""
    match = _KMB.match(str(text).strip())
    if not match:
        raise ConfigError(f"not a size: {quote(text)} (mergekit's syntax: an integer with an optional K, M or B "
                          f"suffix, e.g. 5B, 500M)")
    digits = match.group(1).lstrip("0")
    if len(digits) > 19 or int(match.group(1) or 0) * _KMB_UNITS[match.group(2).lower()] >= MAX_SIZE:
        raise ConfigError(f"size {quote(text)} is larger than any file (at most 2**62 bytes)")
    return int(match.group(1)) * _KMB_UNITS[match.group(2).lower()]



# -- devices ---------------------------------------------------------------------------------------------
def select_devices(kind: str | None, count: int | None = None) -> list:
    """The devices to compute on (count None: every local device of the kind); sets JAX's default device
    when `kind` is given."""
    if count is None:
        platform = {"cpu": "cpu", "gpu": "gpu", "tpu": "tpu"}.get(kind) if kind else None
        try:
            count = len(jax.local_devices(backend=platform) if platform else jax.local_devices())
        except RuntimeError:
            count = 1  # the error for a missing kind is raised below
    if count < 1:
        raise ConfigError(f"--devices must be at least 1, got {count}")
    platform = {"cpu": "cpu", "gpu": "gpu", "tpu": "tpu"}.get(kind) if kind else None
    try:
        devices = jax.devices(platform) if platform else jax.devices()
    except RuntimeError:
        raise ConfigError(f"--device {kind}: no {kind.upper()} is available on this machine "
                          f"(available: {sorted({d.platform for d in jax.devices()})})") from None
    if count > len(devices):
        raise ConfigError(f"--devices {count}: only {len(devices)} {devices[0].platform} device(s) available")
    if platform:
        jax.config.update("jax_default_device", devices[0])
    return devices[:count]


def build_mesh(devices: list):
    """None for one device (no sharding); else a 1-D mesh whose axis "layers" splits stacked layers."""
    if len(devices) <= 1:
        return None
    if importlib.util.find_spec("drm_jax.engine.shard") is None:
        raise ConfigError(f"--devices {len(devices)}: splitting layers over devices needs drm_jax.engine.shard, "
                          f"which this build does not have; use --devices 1")

    return jax.sharding.Mesh(np.array(devices), ("layers",))


# -- output ----------------------------------------------------------------------------------------------
def check_output(out_dir: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse an output that would clobber data: non-empty without --force, not an earlier drm-jax output
    with it (`drm_jax.io.writer.check_replaceable`), a dangling link without it, or overlapping an input
    (models, adapters, the config file: resolved, links followed, in both directions)."""
    refuse_overlap(out_dir, inputs)
    if not force:
        check_dangling_link(out_dir.expanduser(), "--force")
    out = out_dir.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {str(out_dir)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CheckpointError(f"output directory {str(out_dir)!r} exists and is not empty; "
                                  f"pass --force to replace it")
        check_replaceable(out, "--force")


def numpy_dtype(name: str | None) -> np.dtype | None:
    """The numpy dtype of a config's `dtype` / `out_dtype` name (bfloat16 through ml_dtypes); None for None."""
    return None if name is None else dtype_from_name(name)


def python_warning(note: str) -> None:
    """The default `warn` of a merge: a UserWarning (the command line prints one line instead)."""
    warnings.warn(note, UserWarning, stacklevel=2)


def _update_model_config(config_path: Path, dtype_name: str | None, vocab_rows: int | None) -> None:
    """Record the output dtype and (when the vocabulary was rebuilt) its size in config.json."""
    def edit(model_config: dict) -> None:
        if dtype_name is not None:
            for key in [k for k in HF_DTYPE_KEYS if k in model_config] or ["torch_dtype"]:
                model_config[key] = dtype_name
        if vocab_rows is not None:
            text = model_config.get("text_config")
            holder = text if "vocab_size" not in model_config and isinstance(text, dict) else model_config
            holder["vocab_size"] = vocab_rows

    if dtype_name is not None or vocab_rows is not None:
        edit_model_config(config_path, edit)


def _input_templates(config: MergeConfig) -> list:
    """The chat templates of every input model's tokenizer that loads (for `chat_template: auto`)."""
    templates = []
    for ref in referenced_models(config):
        try:
            templates.append(load_tokenizer(model_directory(config, ref), ref).chat_template)
        except UnsafeFileError:
            raise
        except CheckpointError:
            continue
    return templates


def _save_tokenizer(tokenizer, directory: Path, config: MergeConfig, templates) -> None:
    template = resolve_chat_template(config.chat_template, templates)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(directory))


def finish_directory(directory: Path, config_dir: Path | None, dtype_name: str | None, *,
                     config: MergeConfig | None = None, vocabulary=None, tokenizer=None,
                     copy_tokenizer: bool = True,
                     write_model_card: bool = False, name: str | None = None,
                     warn: Callable[[str], None] = python_warning) -> None:
    """Inside the not-yet-renamed output, the files beside the weights, as mergekit writes them:

    - config.json (the reference's, with the output dtype and, when the vocabulary was rebuilt, its
      size), generation_config.json and processor files of the reference;
    - the tokenizer: the one built for `tokenizer_source` / the `tokenizer` block (`tokenizer`, built from
      the plan's `vocabulary`: `drm_jax.config.vocabulary.build_tokenizer`), else,
      with `copy_tokenizer`, the reference's tokenizer files (loaded and saved again when a
      `chat_template` is set, which is written into it);
    - with `write_model_card`: README.md (`drm_jax.config.card`) and mergekit_config.yml.

    `warn(note)` receives what the user should know (a tokenizer that could not be written).
    """
    copy_model_files(config_dir, [n for n in CONFIG_FILE_NAMES if n not in TOKENIZER_FILES], directory)
    _update_model_config(directory / "config.json", dtype_name,
                         vocabulary.rows if vocabulary is not None else None)
    chat_template = config.chat_template if config is not None else None
    if vocabulary is not None:
        _save_tokenizer(tokenizer, directory, config, vocabulary.templates)
    elif copy_tokenizer and config_dir is not None and chat_template:
        try:
            tokenizer = load_tokenizer(Path(config_dir), "chat_template")
        except UnsafeFileError:
            raise
        except CheckpointError as err:
            warn(f"{err}; no tokenizer was written")
        else:
            templates = _input_templates(config) if chat_template == "auto" else []
            _save_tokenizer(tokenizer, directory, config, templates)
    elif copy_tokenizer and config_dir is not None:
        copy_model_files(config_dir, TOKENIZER_FILES, directory)
    elif chat_template:
        warn("chat_template is set but no tokenizer is written (--no-copy-tokenizer); it is not saved")
    if write_model_card and config is not None:
        write_card_files(directory, config, name or "merged model")


def undecomposed_methods(methods: list, counts: dict) -> list[str]:
    """The methods among `methods` whose 2-D weights take a path of their own (DRM's decomposition, the
    subspace methods') when no leaf took it (`counts["matrix"]` is 0): every tensor took their other path."""
    if counts.get("matrix", 0):
        return []
    found = []
    for name in dict.fromkeys(m for m in methods if isinstance(m, str)):
        try:
            spec = get_method(name)
            rules = spec.build({p.name: p.default for p in spec.static})
        except (KeyError, TypeError, ValueError):  # defaults that do not build alone: nothing to say
            continue
        if rules.linear is not rules.other:
            found.append(name)
    return found


def _shard_size(max_memory: int, max_shard_size: int | None, out_shard_size: int | None) -> int:
    if max_shard_size is not None and out_shard_size is not None:
        raise ConfigError("give one of --max-shard-size and --out-shard-size")
    if out_shard_size is not None:
        return out_shard_size if out_shard_size > 0 else UNLIMITED_SHARD
    return max_shard_size or max(1, max_memory // SHARD_SHARE)


# -- the plan --------------------------------------------------------------------------------------------
def _nearest_existing(out_dir: Path) -> Path:
    where = out_dir.expanduser().absolute()
    while not where.exists() and where.parent != where:
        where = where.parent
    return where


def _free_bytes(out_dir: Path) -> int | None:
    """Free bytes on the disk that will hold `out_dir` (its nearest existing folder), or None if unknown."""
    where = _nearest_existing(out_dir)
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None


def output_bytes(segments: Sequence[SegmentPlan], out_dtype: np.dtype | None) -> int:
    """Bytes of tensor data the merge writes: every output tensor's elements times its written dtype."""
    total = 0
    for seg in segments:
        for shape, dtype in zip(seg.shapes, seg.dtypes):
            written = out_dtype if out_dtype is not None and is_floating(dtype) else np.dtype(dtype)
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(written).itemsize
    return total


def check_disk(out_dir: Path, needed: int, what: str = "the output") -> int | None:
    """Refuse a merge whose output cannot be written: its nearest existing folder not writable, or too
    little free space on its disk (`shutil.disk_usage`). Returns the free bytes (None when unknown)."""
    where = _nearest_existing(out_dir)
    if where.is_dir() and not os.access(where, os.W_OK | os.X_OK):
        raise CheckpointError(f"{out_dir}: cannot write the output: {where} is not writable")
    free = _free_bytes(out_dir)
    if free is not None and needed > free:
        raise CheckpointError(f"{out_dir}: {what} needs about {format_size(needed)} of disk but only "
                              f"{format_size(free)} is free there")
    return free


def format_size(n: int) -> str:
    """Bytes for people: '1.2 GB', '340.0 kB', '12 B' (decimal units)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def write_stand_in(directory: Path, segments: Sequence[SegmentPlan], out_dtype: np.dtype | None) -> None:
    """The output's `model.safetensors` with its names, shapes and written dtypes, and no data (a sparse
    file: `drm_jax.io.safetensors_io.write_header_only`)."""
    tensors = {}
    for seg in segments:
        for name, shape, dtype in zip(seg.names, seg.shapes, seg.dtypes):
            tensors[name] = (tuple(shape), out_dtype if out_dtype is not None and is_floating(dtype) else dtype)
    write_header_only(directory / "model.safetensors", tensors)


def describe_plan(plan: ConfigPlan, headers: Headers, config: MergeConfig, *, max_memory: int,
                  shard_size: int) -> dict[str, Any]:
    """What a merge will do, from its plan and the checkpoints' headers only (`merge_checkpoints(...,
    dry_run=True)`): the plan's segments are bound to views of the headers, which hold no tensor data.

    Returns {"segments": [{"key", "method", "models", "roles": {role: tensors}, "groups", "programs"}],
    "roles": tensors per role over all segments, "groups": groups of same-shaped leaves the engine stacks,
    "programs": compiled merge programs (one per method, role, leaf shape and dtype; an upper bound: chunks
    of one group share theirs), "output_bytes", "peak_memory_bytes" (an estimate of the working memory
    above the runtime's own: every merged tensor stacked in float32 over the base and the models, times
    WORKSPACE_FACTOR, capped at `max_memory` but never below the largest single leaf's share, which the
    engine cannot cut; plus twice one output shard, serialized as it is written),
    "notes": what was not checked}."""
    out_dtype = plan.out_numpy_dtype
    segments, _ = bind_segments(plan, header_views(headers))
    group_bytes = max(1, max_memory // WORKSPACE_FACTOR)
    described, roles, programs, largest = [], Counter(), set(), 0
    groups_total = 0
    for seg in segments:
        src = seg.sources
        leaves = src.plan_blocks(len(src.models), max(1, group_bytes // BLOCK_DIVISOR))
        signatures: dict[tuple, int] = {}
        for part, name, shape, dtype in zip(src.parts, leaves.names, leaves.shapes, leaves.dtypes):
            role = src.roles[part[0]] if isinstance(part, tuple) else "other"  # a Slab: the other path
            if role not in ("matrix", "other"):
                continue
            key = (role, tuple(shape), np.dtype(dtype).name)
            signatures[key] = signatures.get(key, 0) + 1
            largest = max(largest, (len(src.models) + 1) * 4 * int(np.prod(shape, dtype=np.int64)))
        programs.update((seg.method,) + k for k in signatures)
        counts = src.counts()
        roles.update(counts)
        groups_total += len(signatures)
        described.append({"key": seg.key, "method": seg.method, "models": len(src.models), "roles": counts,
                          "groups": len(signatures), "programs": len(signatures)})
    stacked = sum((len(seg.sources.models) + 1) * 4 * int(np.prod(shape, dtype=np.int64))
                  for seg in segments for shape, role in zip(seg.sources.info.shapes, seg.sources.roles)
                  if role in ("matrix", "other"))
    peak = (max(min(max_memory, stacked * WORKSPACE_FACTOR), largest * WORKSPACE_FACTOR)
            + 2 * min(shard_size, output_bytes(plan.segments, out_dtype)))
    notes = ["values beyond the output dtype's range (e.g. float16's 65504) and non-finite results need the "
             "tensor data: the merge checks each tensor as it writes it and stops without output"]
    if out_dtype is not None and out_dtype.itemsize < 4 and any(
            np.dtype(d).itemsize >= 4 for seg in plan.segments for d in seg.dtypes if is_floating(d)):
        notes.append(f"out_dtype {out_dtype.name} is narrower than some float32 inputs: values past its range "
                     f"would stop the merge")
    return {"segments": described, "roles": dict(roles), "groups": groups_total, "programs": len(programs),
            "output_bytes": output_bytes(plan.segments, out_dtype), "peak_memory_bytes": peak, "notes": notes,
            "method": config.merge_method}


# -- the command -----------------------------------------------------------------------------------------
def merge_checkpoints(config: MergeConfig, out_dir: Path, *, force: bool = False,
                      devices: list | None = None, max_memory: int = parse_size(DEFAULT_MAX_MEMORY),
                      max_shard_size: int | None = None, recipe: Recipe | None = None,
                      out_shard_size: int | None = None, copy_tokenizer: bool = True,
                      write_model_card: bool = True, progress: Callable[[int], ContextManager] | None = None,
                      warn: Callable[[str], None] = python_warning, dry_run: bool = False,
                      stand_in: Path | None = None) -> dict[str, Any]:
    """Run a checked config end to end; returns {"counts": tensors per engine path, "output": Path}.

    progress: called once with the number of tensors to merge; returns a context manager whose value has
      `on_chunk(group, n_layers)`, called after each merged chunk (`drm_jax.cli.progress.MergeProgress`).
    warn: receives each note for the user (default: a UserWarning).
    dry_run: stop after every check that needs no tensor data (the config, each checkpoint's header and
      config.json, names, shapes and dtypes across models, layer ranges, vocabularies and tokenizers, the
      output's disk space) and return {"plan": `describe_plan`'s dict, "output": Path}; nothing is written.
    stand_in: with dry_run, a folder (existing, empty) where a stand-in of the output is written: its
      safetensors header with no data (`write_stand_in`) and the files beside the weights, so that a later
      stage of a multi-stage dry run checks its inputs as it would check the real output.

    Raises:
      DrmJaxError (ConfigError, CheckpointError, MergeInputError): nothing is left at `out_dir`.
    """
    recipe = recipe or build_recipe(config)
    check_segments(config)  # every slice's recipe, before any checkpoint is read
    out_dir = Path(out_dir)
    check_output(out_dir, force, input_paths(config, config.models if config.slices else recipe.models)
                 + [config.resolve(recipe.reference.model)])
    mesh = build_mesh(devices or [])
    out_dtype_name = config.out_dtype or config.dtype
    shard_size = _shard_size(max_memory, max_shard_size, out_shard_size)
    for note in recipe.warnings:
        warn(note)

    tokenizers = None
    if config.tokenizer_spec is not None:
        tokenizers = read_tokenizers(config)
        for note in tokenizers.warnings:
            warn(note)

    # the inputs' headers, then the plan (`drm_jax.config.plan`): segments, one for a `models` config; the
    # tensors before the layers, each slice and the tensors after the layers for a `slices` config
    entries = input_entries(config, recipe)
    with open_views(config, entries) as (views, arch):
        headers = read_headers([e.model for e in entries], views, arch)
        plan = plan_config(config, headers, recipe=recipe, tokenizers=tokenizers)
        vocabulary, tokenizer = plan.vocabulary, None
        if vocabulary is not None:
            for note in vocabulary.warnings:
                warn(note)
            tokenizer = build_tokenizer(vocabulary, tokenizers)
        out_dtype = plan.out_numpy_dtype
        check_disk(out_dir, output_bytes(plan.segments, out_dtype))
        if dry_run:
            if stand_in is not None:
                write_stand_in(Path(stand_in), plan.segments, out_dtype)
                finish_directory(Path(stand_in), headers.of(plan.reference).config_dir, out_dtype_name,
                                 config=config, vocabulary=vocabulary, tokenizer=tokenizer,
                                 copy_tokenizer=copy_tokenizer, warn=warn)
                set_layer_count(Path(stand_in) / "config.json", plan.layer_updates)
            return {"plan": describe_plan(plan, headers, config, max_memory=max_memory, shard_size=shard_size),
                    "output": out_dir}
        segments, reference = bind_segments(plan, views)
        group_bytes = max(1, max_memory // WORKSPACE_FACTOR)
        for seg in segments:
            seg.sources.plan_blocks(len(seg.sources.models), max(1, group_bytes // BLOCK_DIVISOR))
        total = sum(seg.sources.merged_count() for seg in segments)
        with progress(total) if progress is not None else contextlib.nullcontext() as bar:
            writer = CheckpointWriter(out_dir, max_shard_size=shard_size, overwrite=force, **writer_options(reference))
            with writer:
                counts = merge_segments(segments, writer.add, layout=naming.layout_for(arch), mesh=mesh,
                                        max_group_bytes=group_bytes, block_bytes=max(1, group_bytes // BLOCK_DIVISOR),
                                        on_chunk=bar.on_chunk if bar is not None else None,
                                        compute_dtype=config.dtype)
                for method in undecomposed_methods([seg.method for seg in segments], counts):
                    warn(f"merge_method {method}: no tensor went through its decomposition (no 2-D weight "
                         f"outside the embeddings and LM heads); every tensor took its other path")
                finish_directory(writer.tmp_dir, reference.config_dir, out_dtype_name, config=config,
                                 vocabulary=vocabulary, tokenizer=tokenizer, copy_tokenizer=copy_tokenizer,
                                 write_model_card=write_model_card, name=out_dir.resolve().name, warn=warn)
                set_layer_count(writer.tmp_dir / "config.json", plan.layer_updates)
                output = writer.close()
    return {"counts": counts, "output": Path(output)}


__all__ = ["check_output", "describe_plan", "format_size", "merge_checkpoints", "numpy_dtype", "output_bytes",
           "parse_kmb", "parse_size", "python_warning", "select_devices", "write_stand_in"]
