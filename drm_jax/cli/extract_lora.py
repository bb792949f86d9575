"""`drm-jax extract-lora FINETUNED BASE OUT_DIR --max-rank R`: a PEFT LoRA adapter from a weight delta.

mergekit-extract-lora's job (docs/methods.md#extract-lora): each linear weight's delta finetuned - base
becomes LoRA factors of rank at most R (fewer where singular values are at most --sv-epsilon times the
largest, or at most --absolute-sv-epsilon: mergekit's --sv-epsilon); embeddings, the output head and every tensor that is not a
linear weight are saved whole (PEFT's modules_to_save). The adapter is written atomically; an existing
non-empty OUT_DIR is refused unless --overwrite (alias --force) is given.
"""

from __future__ import annotations

import argparse
import sys

from drm_jax.extract import extract_lora
from drm_jax.math.truncated_svd import SVD_ROUTES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "extract-lora",
        help="extract a PEFT LoRA adapter from a fine-tuned model and its base (mergekit-extract-lora)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("finetuned", metavar="FINETUNED", help="fine-tuned model (directory or file)")
    parser.add_argument("base", metavar="BASE", help="base model it was fine-tuned from")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="adapter directory to write")
    parser.add_argument("--max-rank", type=int, required=True, metavar="R", help="largest LoRA rank")
    parser.add_argument("--absolute-sv-epsilon", type=float, default=0.0, metavar="E",
                        help="also drop singular values at most E (mergekit's rule; default 0: off)")
    parser.add_argument("--sv-epsilon", type=float, default=0.0, metavar="E",
                        help="also drop singular values at most E times the matrix's largest (default 0: off)")
    parser.add_argument("--embed-lora", action="store_true",
                        help="LoRA factors for embeddings and the output head too (default: saved whole)")
    parser.add_argument("--svd-route", choices=SVD_ROUTES, default="auto",
                        help="truncated SVD: dense, randomized, or auto (randomized where R is far below the "
                             "matrix size; default)")
    parser.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                        help="replace an existing non-empty OUT_DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = extract_lora(args.finetuned, args.base, args.out_dir, max_rank=args.max_rank,
                          absolute_sv_epsilon=args.absolute_sv_epsilon, sv_epsilon=args.sv_epsilon,
                          embed_lora=args.embed_lora, svd_route=args.svd_route, overwrite=args.overwrite)
    ranks = sorted(set(result.ranks.values()))
    span = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    print(f"wrote {result.out_dir}: {len(result.ranks)} LoRA modules (rank {span}), "
          f"{len(result.modules_to_save)} modules saved whole", file=sys.stderr)
    if result.skipped:
        print(f"left out {len(result.skipped)} tensors that are neither a module's weight nor its bias: "
              f"{', '.join(result.skipped[:5])}{' ...' if len(result.skipped) > 5 else ''}", file=sys.stderr)
    return 0
