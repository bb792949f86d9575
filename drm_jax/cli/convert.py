"""`drm-jax convert SRC DST --to {hf,flax,orbax,t5x,maxtext}`: convert a checkpoint between formats.

The source format is detected (Hugging Face safetensors, PyTorch .bin/.pt, Flax msgpack, Orbax, T5X,
MaxText, or a PEFT adapter, which converts to its merged model given --base). MaxText converts to and
from the Llama family (Llama, Mistral) as MaxText's own converter maps it. config.json and tokenizer files are
copied beside the weights. Output is written to a temporary directory and renamed into place; an
existing non-empty DST is refused unless --overwrite (alias --force) is given, and even then unless it
holds an earlier drm-jax output.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from drm_jax.config.merge import MAX_SIZE
from drm_jax.errors import quote
from drm_jax.io.architectures import ARCHITECTURES
from drm_jax.io.convert import convert_checkpoint
from drm_jax.io.maxtext_convert import ROPE_LAYOUTS
from drm_jax.io.writer import DEFAULT_MAX_SHARD_SIZE, WRITE_FORMATS, check_dangling_link, check_replaceable, refuse_overlap

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from "5GB", "500MiB", "2e9" or "1048576" (decimal units are powers of 10, "iB" of 2)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 5GB, 500MiB, 1000000)")
    size = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not size < MAX_SIZE:  # 1e999 is inf as a float
        raise argparse.ArgumentTypeError(f"size {quote(text)} is larger than any file (at most 2**62 bytes)")
    size = int(size)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between Hugging Face, Flax, Orbax, T5X and MaxText formats",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("src", metavar="SRC", help="source checkpoint (file or directory; format detected)")
    parser.add_argument("dst", metavar="DST", help="output directory")
    parser.add_argument("--to", required=True, choices=WRITE_FORMATS, help="output format")
    parser.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                        help="replace DST when it holds an earlier drm-jax output (never other files)")
    parser.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_SIZE,
                        help="largest safetensors shard for --to hf (default 5GiB; e.g. 2GB, 500MiB)")
    parser.add_argument("--base", metavar="PATH", default=None,
                        help="base model of a PEFT adapter SRC (the adapter is merged into it)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default=None,
                        help="name-map table to use (default: detected from config.json)")
    maxtext = parser.add_argument_group("MaxText", "config.json values MaxText's shapes cannot tell (MaxText "
                                        "source; default: a config.json beside it, else MaxText's defaults)")
    maxtext.add_argument("--rope-theta", type=float, default=None, help="rope_theta (MaxText default 10000)")
    maxtext.add_argument("--rms-norm-eps", type=float, default=None, help="rms_norm_eps (MaxText default 1e-5)")
    maxtext.add_argument("--max-position-embeddings", type=int, default=None,
                         help="max_position_embeddings (MaxText default 2048)")
    maxtext.add_argument("--model-type", choices=("llama", "mistral"), default=None, help="default llama")
    maxtext.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                         help="--to maxtext: stack the layers on MaxText's scan axis (default: on)")
    maxtext.add_argument("--maxtext-rope", choices=ROPE_LAYOUTS, default="interleaved",
                         help="MaxText's rotary layout within a head: interleaved (default; MaxText's LLaMA "
                              "rotary embedding, model_name/rope_type llama3.1, as its converter writes) or "
                              "halves (a run at rope_type default, e.g. model_name=default)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # the writer checks the same, but its messages name the Python API's overwrite=True; an overlap with an
    # input is the better reason, so it is checked first
    refuse_overlap(args.dst, [args.src] + ([args.base] if args.base is not None else []), what="destination")
    if args.overwrite:
        check_replaceable(Path(args.dst).expanduser(), "--force")
    else:
        check_dangling_link(Path(args.dst).expanduser(), "--force")
    hf_config = {"rope_theta": args.rope_theta, "rms_norm_eps": args.rms_norm_eps,
                 "max_position_embeddings": args.max_position_embeddings, "model_type": args.model_type}
    defaulted: list[str] = []
    out = convert_checkpoint(args.src, args.dst, args.to, overwrite=args.overwrite,
                             max_shard_size=args.max_shard_size, base=args.base, arch=args.arch,
                             hf_config=hf_config, scan_layers=args.scan_layers, defaulted=defaulted,
                             maxtext_rope=args.maxtext_rope)
    print(f"wrote {args.to} checkpoint to {out}")
    if defaulted:
        print(f"config.json: {', '.join(defaulted)} at MaxText's defaults (set them with "
              f"{', '.join('--' + k.replace('_', '-') for k in defaulted)})")
    return 0
