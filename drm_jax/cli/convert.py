"""`drm-jax convert SRC DST --to {hf,flax,orbax,t5x}`: convert a checkpoint between formats.

The source format is detected (Hugging Face safetensors, PyTorch .bin/.pt, Flax msgpack, Orbax, T5X, or
a PEFT adapter, which converts to its merged model given --base). config.json and tokenizer files are
copied beside the weights. Output is written to a temporary directory and renamed into place; an
existing non-empty DST is refused unless --overwrite (alias --force) is given.
"""

from __future__ import annotations

import argparse
import re

from drm_jax.io.architectures import ARCHITECTURES
from drm_jax.io.convert import convert_checkpoint
from drm_jax.io.writer import DEFAULT_MAX_SHARD_SIZE, WRITE_FORMATS

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from "5GB", "500MiB", "2e9" or "1048576" (decimal units are powers of 10, "iB" of 2)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 5GB, 500MiB, 1000000)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between Hugging Face, Flax, Orbax and T5X formats",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("src", metavar="SRC", help="source checkpoint (file or directory; format detected)")
    parser.add_argument("dst", metavar="DST", help="output directory")
    parser.add_argument("--to", required=True, choices=WRITE_FORMATS, help="output format")
    parser.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                        help="replace DST if it exists and is not empty")
    parser.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest safetensors shard for --to hf (default 5GiB; e.g. 2GB, 500MiB)")
    parser.add_argument("--base", metavar="PATH", default=None,
                        help="base model of a PEFT adapter SRC (the adapter is merged into it)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default=None,
                        help="name-map table to use (default: detected from config.json)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = convert_checkpoint(args.src, args.dst, args.to, overwrite=args.overwrite,
                             max_shard_size=args.max_shard_size, base=args.base, arch=args.arch)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0
