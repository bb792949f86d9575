"""`drm-jax merge CONFIG OUT_DIR`: a mergekit-style YAML config in, a merged checkpoint out, streamed.

    drm-jax merge examples/configs/drm.yaml merged/ [--force] [--quiet] [--device cpu|gpu|tpu]
        [--devices N] [--max-memory 1GB] [--max-shard-size SIZE | --out-shard-size 5B]
        [--copy-tokenizer | --no-copy-tokenizer] [--write-model-card | --no-write-model-card]
        [--adapter-out [--adapter-rank R]] [--intermediate-dir DIR] [--dry-run]
        [mergekit-yaml's options: drm_jax.cli.mergekit_options]

Only the command line lives here: the flags become the keywords of `drm_jax.merge_config`
(`drm_jax.config.run`), which checks, plans and runs the merge; this module shows its progress bar, its
warnings and its summary. Errors propagate to `drm_jax.cli.main` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path
from typing import Callable

import jax

from drm_jax.cli.mergekit_options import apply_mergekit_options, device_name, register_mergekit_options
from drm_jax.cli.progress import MergeProgress
from drm_jax.config.merge import DEFAULT_MAX_MEMORY, format_size, parse_kmb, parse_size
from drm_jax.config.run import merge_config
from drm_jax.errors import ConfigError, one_line


def _argument(parse: Callable[[str], int]) -> Callable[[str], int]:
    """An argparse type from a size parser: its ConfigError becomes argparse's usage error."""
    def parse_argument(text: str) -> int:
        try:
            return parse(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse_argument.__name__ = parse.__name__  # argparse names the type in its messages
    return parse_argument


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
    parser.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                        help="no progress bar and no summary")
    parser.add_argument("--device", type=device_name, default=None,
                        help="where to compute: cpu, gpu (mergekit's cuda), tpu, or auto (default: JAX's default "
                             "device)")
    parser.add_argument("--devices", type=int, default=None, metavar="N",
                        help="split stacked layers over N local devices of that kind (default: all of them)")
    parser.add_argument("--max-memory", type=_argument(parse_size), default=parse_size(DEFAULT_MAX_MEMORY),
                        metavar="SIZE",
                        help=f"working-memory budget that sizes the chunks of stacked layers and the output "
                             f"shards (default {DEFAULT_MAX_MEMORY})")
    parser.add_argument("--max-shard-size", type=_argument(parse_size), default=None, metavar="SIZE",
                        help="largest output shard in bytes (default: a tenth of --max-memory)")
    parser.add_argument("--out-shard-size", type=_argument(parse_kmb), default=None, metavar="SIZE",
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
    register_mergekit_options(parser)
    parser.add_argument("--intermediate-dir", "-I", type=Path, default=None, metavar="DIR",
                        help="a multi-stage config (several YAML documents, mergekit-multi's format): write its "
                             "named stages to DIR/<name> and keep them (default: a temporary folder, removed)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything that needs no tensor data (config, headers, shapes, layer ranges, "
                             "vocabularies, disk space) and print the plan; write nothing")
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
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def enable_compilation_cache() -> None:
    """Keep compiled merge programs on disk between runs (JAX's persistent compilation cache), so a second
    `drm-jax merge` of models of the same shapes compiles nothing. DRM_JAX_CACHE_DIR sets the folder
    (default: $XDG_CACHE_HOME/drm_jax/xla or ~/.cache/drm_jax/xla); DRM_JAX_CACHE_DIR=off disables it.
    Best effort: an unwritable folder only costs the compilations."""
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


def _warn(note: str) -> None:
    print(f"drm-jax: warning: {one_line(note)}", file=sys.stderr)


def _note(text: str) -> None:
    print(f"drm-jax: note: {one_line(text)}", file=sys.stderr)


def _silent(text: str) -> None:
    """--quiet: mergekit's notes are not essential output."""


def _print_adapter(result: dict, out_dir: Path) -> None:
    counts = {p: sum(1 for v in result["paths"].values() if v == p) for p in ("factored", "concatenated", "dense")}
    worst = max(result["discarded"].values(), default=0.0)
    print(f"drm-jax: wrote a rank-{result['rank']} LoRA adapter of {result['weights']} weights to {out_dir} "
          f"({counts['factored']} merged in factored form, {counts['concatenated']} as concatenated factors, "
          f"{counts['dense']} formed and truncated; largest discarded energy {worst:.3g})", file=sys.stderr)


def _print_adapter_plan(plan: dict, where: Path) -> None:
    """The plan of `--adapter-out --dry-run`: the merged adapter's weights and ranks, and its files."""
    embeddings = sum(w["embedding"] for w in plan["weights"])
    print(f"{where}: {plan['method']} of {plan['models']} models into one rank-{plan['rank']} LoRA adapter of "
          f"{len(plan['weights'])} weights ({embeddings} embeddings), {plan['dtype']}; files "
          f"{', '.join(plan['files'])}")
    for w in plan["weights"]:
        print(f"  {w['name']}: ranks {' + '.join(map(str, w['ranks']))} -> {w['rank']}"
              + (" (embedding)" if w["embedding"] else ""))


def print_plan(result: dict, out_dir: Path) -> None:
    """The plan of `--dry-run` on stdout: per stage and segment, tensors per role, groups, programs."""
    for stage in result.get("stages", [{"name": None, **result}]):
        plan, where = stage["plan"], stage["output"]
        title = f"stage {stage['name']}: " if stage.get("name") is not None else ""
        if plan.get("adapter"):
            _print_adapter_plan(plan, where)
            continue
        if "segments" not in plan:
            print(f"{title}{where}: {plan['checked']}")
            continue
        roles = ", ".join(f"{n} {role}" for role, n in plan["roles"].items() if n)
        print(f"{title}{where}: {plan['method']}; tensors: {roles}; {plan['groups']} groups, at most "
              f"{plan['programs']} compiled programs; output {format_size(plan['output_bytes'])}, peak memory about "
              f"{format_size(plan['peak_memory_bytes'])}")
        if len(plan["segments"]) > 1:
            for seg in plan["segments"]:
                roles = ", ".join(f"{n} {role}" for role, n in seg["roles"].items() if n)
                print(f"  {seg['key']}: {seg['method']} of {seg['models']} models; {roles}; {seg['groups']} groups")
        for note in plan["notes"]:
            print(f"  not checked: {note}")
    print(f"drm-jax: dry run: no problem found; nothing was written to {out_dir}")


def run(args: argparse.Namespace) -> int:
    """Entry point of `drm-jax merge`; DrmJaxErrors propagate to `drm_jax.cli.main` (one line, exit 2)."""
    mergekit_options = apply_mergekit_options(args, note=_silent if args.quiet else _note)
    return_freed_memory_to_the_os()
    enable_compilation_cache()
    bars: list[MergeProgress] = []

    def progress(total: int) -> MergeProgress:
        bars.append(MergeProgress(total, quiet=args.quiet))
        return bars[-1]

    result = merge_config(args.config, args.out_dir, force=args.force, device=args.device, devices=args.devices,
                          max_memory=args.max_memory, max_shard_size=args.max_shard_size,
                          out_shard_size=args.out_shard_size, copy_tokenizer=args.copy_tokenizer,
                          write_model_card=args.write_model_card, adapter_out=args.adapter_out,
                          adapter_rank=args.adapter_rank, intermediate_dir=args.intermediate_dir,
                          dry_run=args.dry_run, progress=progress, warn=_warn, **mergekit_options)
    if args.dry_run:
        print_plan(result, args.out_dir)
        return 0
    if "stages" in result:
        for bar, stage in zip(bars, [s for s in result["stages"] if "counts" in s]):
            bar.summary(stage["counts"], output=str(stage["output"]))
        return 0
    if args.adapter_out and not args.quiet:
        _print_adapter(result, args.out_dir)
    for bar in bars:
        bar.summary(result["counts"], output=str(args.out_dir))
    return 0


__all__ = ["register", "run"]
