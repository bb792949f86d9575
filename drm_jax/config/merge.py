"""`drm-jax merge CONFIG OUT_DIR`: a mergekit-style YAML config in, a merged checkpoint out, streamed.

    drm-jax merge examples/configs/drm.yaml merged/ [--force] [--quiet] [--device cpu|gpu|tpu]
        [--devices N] [--max-memory 1GB] [--max-shard-size SIZE | --out-shard-size 5B]
        [--copy-tokenizer | --no-copy-tokenizer] [--write-model-card | --no-write-model-card]

The config is checked first (`drm_jax.config.schema`), translated into engine arguments with mergekit's
semantics (`drm_jax.config.recipe`), the checkpoints are opened lazily and checked against each other
(`drm_jax.config.streaming`), then `drm_jax.engine.merge.merge_leaves` merges one chunk of one group of
same-shaped tensors at a time, reading tensors on demand, and the writer flushes the output shard by
shard into a temporary directory that is renamed to OUT_DIR at the end. Peak memory is a few tensor
groups (bounded by `--max-memory`), not the models. Any failure leaves no OUT_DIR behind and never
touches the inputs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from drm_jax.io import naming
from drm_jax.config.schema import MergeConfig, load_config
from drm_jax.cli.progress import MergeProgress
from drm_jax.config.recipe import Recipe, build_recipe
from drm_jax.config.streaming import input_paths
from drm_jax.errors import CheckpointError, ConfigError, DrmJaxError, UnsafeFileError, one_line, quote
from drm_jax.io.base import CONFIG_FILE_NAMES
from drm_jax.io.model_files import TOKENIZER_FILES, copy_model_files
from drm_jax.io.maxtext_io import writer_options
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
NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "float64": "float64", "bfloat16": "bfloat16"}
HF_DTYPE_KEYS = ("torch_dtype", "dtype")
_KMB = re.compile(r"^(\d+)([kmb]?)$", re.IGNORECASE)
_KMB_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}
# Larger than any memory or file a size option can describe; sizes at or above it are refused.
MAX_SIZE = 2**62


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000, '2GiB' -> 2 * 2**30, '1234' or '1234B' -> 1234 bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512MB, 2GiB, 1000000)")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"unknown size unit in {text!r}")
    size = number * _UNITS[unit]
    if not size < MAX_SIZE:  # a 400-digit number is inf as a float
        raise argparse.ArgumentTypeError(f"size {quote(text)} is larger than any memory or file (at most 2**62 bytes)")
    if int(size) <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(size)


def parse_kmb(text: str) -> int:
    """mergekit's size syntax for --out-shard-size: an integer with an optional K / M / B suffix
    (thousand, million, billion): '5B' -> 5_000_000_000, '500M', '1000'. 0 means no limit."""
    match = _KMB.match(str(text).strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (mergekit's syntax: an integer with an optional "
                                         f"K, M or B suffix, e.g. 5B, 500M)")
    digits = match.group(1).lstrip("0")
    if len(digits) > 19 or int(match.group(1) or 0) * _KMB_UNITS[match.group(2).lower()] >= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size {quote(text)} is larger than any file (at most 2**62 bytes)")
    return int(match.group(1)) * _KMB_UNITS[match.group(2).lower()]


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `merge` subcommand to the `drm-jax` parser."""
    parser = subparsers.add_parser(
        "merge",
        help="merge models described by a mergekit-style YAML config",
        description="Merge fine-tuned models with a mergekit-style YAML config (merge_method: any of "
                    "`drm-jax methods`, mergekit's included). Tensors are streamed: peak memory is a few tensor "
                    "groups, not the models.",
    )
    parser.add_argument("config", type=Path, help="YAML merge configuration (mergekit schema)")
    parser.add_argument("out_dir", type=Path, help="output directory (Hugging Face safetensors layout)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT_DIR when it holds an earlier drm-jax output (never other files)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    parser.add_argument("--device", choices=("cpu", "gpu", "tpu"), default=None,
                        help="where to compute (default: JAX's default device)")
    parser.add_argument("--devices", type=int, default=None, metavar="N",
                        help="split stacked layers over N local devices of that kind (default: all of them)")
    parser.add_argument("--max-memory", type=parse_size, default=parse_size(DEFAULT_MAX_MEMORY), metavar="SIZE",
                        help=f"working-memory budget that sizes the chunks of stacked layers and the output "
                             f"shards (default {DEFAULT_MAX_MEMORY})")
    parser.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                        help="largest output shard in bytes (default: a tenth of --max-memory)")
    parser.add_argument("--out-shard-size", type=parse_kmb, default=None, metavar="SIZE",
                        help="mergekit's name and syntax for the largest shard: bytes of tensor data with an "
                             "optional K / M / B (thousand, million, billion) suffix, e.g. 5B; 0: one file")
    parser.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                        help="copy the reference model's tokenizer into the output when the config builds none "
                             "(default: on)")
    parser.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                        help="write README.md (a model card) and mergekit_config.yml (default: on)")
    parser.add_argument("--adapter-out", action="store_true",
                        help="the models are PEFT LoRA adapters of base_model: write OUT_DIR as one merged LoRA "
                             "adapter (merged in factored form where the method allows) instead of the model")
    parser.add_argument("--adapter-rank", type=int, default=None, metavar="R",
                        help="with --adapter-out: the merged adapter's rank (default K r: exact where the merge "
                             "factors)")
    parser.set_defaults(func=run)
    return parser


def return_freed_memory_to_the_os() -> None:
    """Make glibc serve allocations of 1 MiB and more with mmap, so freed tensors go back to the operating
    system at once. With glibc's default (a threshold that grows up to 32 MiB), the tensors of one group
    stay in the heap after it is merged and the process grows by fragmentation: streaming keeps only a few
    tensors alive, and this keeps the resident set near that. No effect elsewhere than glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def enable_compilation_cache() -> None:
    """Keep compiled merge programs on disk between runs (JAX's persistent compilation cache), so a second
    `drm-jax merge` of models of the same shapes compiles nothing. DRM_JAX_CACHE_DIR sets the folder
    (default: $XDG_CACHE_HOME/drm_jax/xla or ~/.cache/drm_jax/xla); DRM_JAX_CACHE_DIR=off disables it.
    Best effort: an unwritable folder only costs the compilations."""
    import os

    import jax

    where = os.environ.get("DRM_JAX_CACHE_DIR")
    if where == "off":
        return
    if where is None:
        where = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "drm_jax" / "xla")
    try:
        Path(where).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", where)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except (OSError, AttributeError, ValueError):
        pass


# -- devices ---------------------------------------------------------------------------------------------
def select_devices(kind: str | None, count: int | None = None) -> list:
    """The devices to compute on (count None: every local device of the kind); sets JAX's default device
    when `kind` is given."""
    import jax

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
    import importlib.util

    import jax

    if importlib.util.find_spec("drm_jax.engine.shard") is None:
        raise ConfigError(f"--devices {len(devices)}: splitting layers over devices needs drm_jax.engine.shard, "
                          f"which this build does not have; use --devices 1")

    return jax.sharding.Mesh(np.array(devices), ("layers",))


# -- output ----------------------------------------------------------------------------------------------
def check_output(out_dir: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse an output that would clobber data: non-empty without --force, not an earlier drm-jax output
    with it (`drm_jax.io.writer.check_replaceable`), a dangling link without it, or overlapping an input
    (models, adapters, the config file: resolved, links followed, in both directions)."""
    from drm_jax.io.writer import check_dangling_link, check_replaceable, refuse_overlap

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


def _numpy_dtype(name: str | None):
    if name is None:
        return None
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(NUMPY_DTYPES[name])


def _warn(note: str) -> None:
    print(f"drm-jax: warning: {one_line(note)}", file=sys.stderr)


def _update_model_config(config_path: Path, dtype_name: str | None, vocab_rows: int | None) -> None:
    """Record the output dtype and (when the vocabulary was rebuilt) its size in config.json."""
    if not config_path.is_file() or (dtype_name is None and vocab_rows is None):
        return
    try:
        model_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # not ours to repair: it was copied as it is
    if not isinstance(model_config, dict):
        return
    if dtype_name is not None:
        keys = [k for k in HF_DTYPE_KEYS if k in model_config] or ["torch_dtype"]
        for key in keys:
            model_config[key] = dtype_name
    if vocab_rows is not None:
        text = model_config.get("text_config")
        holder = text if "vocab_size" not in model_config and isinstance(text, dict) else model_config
        holder["vocab_size"] = vocab_rows
    config_path.write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _input_templates(config: MergeConfig) -> list:
    """The chat templates of every input model's tokenizer that loads (for `chat_template: auto`)."""
    from drm_jax.config.card import referenced_models
    from drm_jax.config.vocabulary import load_tokenizer, model_directory

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
    from drm_jax.config.chat_templates import resolve_chat_template

    template = resolve_chat_template(config.chat_template, templates)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(directory))


def finish_directory(directory: Path, config_dir: Path | None, dtype_name: str | None, *,
                     config: MergeConfig | None = None, vocabulary=None, copy_tokenizer: bool = True,
                     write_model_card: bool = False, name: str | None = None) -> None:
    """Inside the not-yet-renamed output, the files beside the weights, as mergekit writes them:

    - config.json (the reference's, with the output dtype and, when the vocabulary was rebuilt, its
      size), generation_config.json and processor files of the reference;
    - the tokenizer: the one built for `tokenizer_source` / the `tokenizer` block (`vocabulary`), else,
      with `copy_tokenizer`, the reference's tokenizer files (loaded and saved again when a
      `chat_template` is set, which is written into it);
    - with `write_model_card`: README.md (`drm_jax.config.card`) and mergekit_config.yml.
    """
    copy_model_files(config_dir, [n for n in CONFIG_FILE_NAMES if n not in TOKENIZER_FILES], directory)
    _update_model_config(directory / "config.json", dtype_name,
                         vocabulary.rows if vocabulary is not None else None)
    chat_template = config.chat_template if config is not None else None
    if vocabulary is not None:
        _save_tokenizer(vocabulary.tokenizer, directory, config, vocabulary.templates)
    elif copy_tokenizer and config_dir is not None and chat_template:
        from drm_jax.config.vocabulary import load_tokenizer

        try:
            tokenizer = load_tokenizer(Path(config_dir), "chat_template")
        except UnsafeFileError:
            raise
        except CheckpointError as err:
            _warn(f"{err}; no tokenizer was written")
        else:
            templates = _input_templates(config) if chat_template == "auto" else []
            _save_tokenizer(tokenizer, directory, config, templates)
    elif copy_tokenizer and config_dir is not None:
        copy_model_files(config_dir, TOKENIZER_FILES, directory)
    elif chat_template:
        _warn("chat_template is set but no tokenizer is written (--no-copy-tokenizer); it is not saved")
    if write_model_card and config is not None:
        from drm_jax.config.card import write_card_files

        write_card_files(directory, config, name or "merged model")


def undecomposed_methods(methods: list, counts: dict) -> list[str]:
    """The methods among `methods` whose 2-D weights take a path of their own (DRM's decomposition, the
    subspace methods') when no leaf took it (`counts["linear"]` is 0): every tensor took their other path."""
    if counts.get("linear", 0):
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


# -- the command -----------------------------------------------------------------------------------------
def merge_checkpoints(config: MergeConfig, out_dir: Path, *, force: bool = False, quiet: bool = False,
                      devices: list | None = None, max_memory: int = parse_size(DEFAULT_MAX_MEMORY),
                      max_shard_size: int | None = None, recipe: Recipe | None = None,
                      out_shard_size: int | None = None, copy_tokenizer: bool = True,
                      write_model_card: bool = True) -> dict[str, Any]:
    """Run a checked config end to end; returns {"counts": ..., "summary": ..., "output": Path}.

    Raises:
      DrmJaxError (ConfigError, CheckpointError, MergeInputError): nothing is left at `out_dir`.
    """
    from drm_jax.config.segments import check_segments, merge_segments, open_segments, set_layer_count
    from drm_jax.io.writer import CheckpointWriter

    recipe = recipe or build_recipe(config)
    check_segments(config)  # every slice's recipe, before any checkpoint is read
    out_dir = Path(out_dir)
    check_output(out_dir, force, input_paths(config, config.models if config.slices else recipe.models)
                 + [config.resolve(recipe.reference.model)])
    mesh = build_mesh(devices or [])
    out_dtype_name = config.out_dtype or config.dtype
    shard_size = _shard_size(max_memory, max_shard_size, out_shard_size)
    for note in recipe.warnings:
        _warn(note)

    vocabulary, wrap = None, None
    if config.tokenizer_spec is not None:
        from drm_jax.config.vocabulary import align_views, plan_vocabulary

        vocabulary = plan_vocabulary(config)
        for note in vocabulary.warnings:
            _warn(note)
        cast = _numpy_dtype(config.dtype)

        def aligned(refs, views):
            return align_views(vocabulary, refs, views, cast)

        wrap = aligned

    # segments: one merge for a `models` config, the tensors before the layers, each slice and the tensors
    # after the layers for a `slices` config (drm_jax.config.segments)
    with open_segments(config, recipe, _numpy_dtype(out_dtype_name), wrap_views=wrap) as (segments, arch, reference,
                                                                                          layer_count):
        group_bytes = max(1, max_memory // WORKSPACE_FACTOR)
        for seg in segments:
            seg.sources.plan_blocks(len(seg.sources.models), max(1, group_bytes // BLOCK_DIVISOR))
        with MergeProgress(sum(seg.sources.merged_count() for seg in segments), quiet=quiet) as progress:
            writer = CheckpointWriter(out_dir, max_shard_size=shard_size, overwrite=force, **writer_options(reference))
            with writer:
                counts = merge_segments(segments, writer.add, layout=naming.layout_for(arch), mesh=mesh,
                                        max_group_bytes=group_bytes, block_bytes=max(1, group_bytes // BLOCK_DIVISOR),
                                        on_chunk=progress.on_chunk, compute_dtype=config.dtype)
                for method in undecomposed_methods([seg.method for seg in segments], counts):
                    _warn(f"merge_method {method}: no tensor went through its decomposition (no 2-D weight "
                          f"outside the embeddings and LM heads); every tensor took its other path")
                finish_directory(writer.tmp_dir, reference.config_dir, out_dtype_name, config=config,
                                 vocabulary=vocabulary, copy_tokenizer=copy_tokenizer,
                                 write_model_card=write_model_card, name=out_dir.resolve().name)
                set_layer_count(writer.tmp_dir / "config.json", layer_count)
                output = writer.close()
            summary = progress.summary(counts, output=str(out_dir))
    return {"counts": counts, "summary": summary, "output": Path(output)}


def run(args: argparse.Namespace) -> int:
    """Entry point of `drm-jax merge`; DrmJaxErrors propagate to `drm_jax.cli.main` (one line, exit 2)."""
    return_freed_memory_to_the_os()
    enable_compilation_cache()
    config = load_config(args.config)
    recipe = build_recipe(config)
    # The config file is an input too: --force must never remove the folder holding it.
    check_output(Path(args.out_dir), args.force,
                 [Path(args.config), *input_paths(config, config.models if config.slices else recipe.models),
                  config.resolve(recipe.reference.model)])
    devices = select_devices(args.device, args.devices)
    if getattr(args, "adapter_out", False) or getattr(args, "adapter_rank", None) is not None:
        from drm_jax.config.adapter_out import run_adapter_out

        return run_adapter_out(args, config, recipe)
    try:
        merge_checkpoints(config, args.out_dir, force=args.force, quiet=args.quiet, devices=devices,
                          max_memory=args.max_memory, max_shard_size=args.max_shard_size, recipe=recipe,
                          out_shard_size=args.out_shard_size, copy_tokenizer=args.copy_tokenizer,
                          write_model_card=args.write_model_card)
    except OSError as err:
        if isinstance(err, DrmJaxError):
            raise
        # e.g. an unwritable output directory or a full disk: one line, no traceback
        where = err.filename or args.out_dir
        raise CheckpointError(f"{where}: {err.strerror or err}") from None
    return 0


__all__ = ["build_mesh", "check_output", "finish_directory", "merge_checkpoints", "parse_kmb", "parse_size", "register",
           "run", "select_devices"]
