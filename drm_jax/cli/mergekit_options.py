"""mergekit-yaml's options (mergekit 0.1.5) on `drm-jax merge`, so a mergekit command line runs unchanged.

Each option is honored, or accepted with one line saying what it means here, or refused with the reason:

  honored      --cuda / --gpu-rich (--device gpu), --device cuda|cuda:N|auto|cpu, --random-seed N (the seed of
               the random methods where the config gives none), --transformers-cache DIR (the Hugging Face
               cache that `org/name` models are found in), --quiet / --no-quiet, and (in `drm_jax.cli.merge`)
               --out-shard-size, --copy-tokenizer, --write-model-card
  a note       --lazy-unpickle, --low-cpu-memory, --read-to-gpu, --multi-gpu, --clone-tensors,
               --no-safe-serialization, --async-write, --write-threads, --num-threads / -j, -v / --verbose,
               --allow-crimes, --lora-merge-cache, --lora-merge-dtype
  refused      --trust-remote-code (remote code is never run), --unsafe-truncate-embeddings (rows are never
               dropped silently)

Every `--X` flag of mergekit also takes its `--no-X` form, which is the default and says nothing.
"""

from __future__ import annotations

import argparse
from typing import Callable

from drm_jax.errors import ConfigError

# mergekit's device names: torch's ("cuda", "cuda:1"), "auto" (the default device), and drm-jax's own.
_DEVICES = {"cpu": "cpu", "gpu": "gpu", "tpu": "tpu", "cuda": "gpu", "auto": None}

# Flags accepted with one line saying what they mean here (given as --flag, or with a value where noted).
NOTES = {
    "lazy_unpickle": "--lazy-unpickle: lazy loading is always on here (tensors are read one group at a time)",
    "low_cpu_memory": "--low-cpu-memory: working memory is bounded by --max-memory here, whatever the device",
    "read_to_gpu": "--read-to-gpu: tensors are read into host memory and moved to the compute device one "
                   "group at a time",
    "multi_gpu": "--multi-gpu: stacked layers are split over every local device of the kind by default "
                 "(--devices N to use fewer)",
    "clone_tensors": "--clone-tensors: every output tensor is written from its own buffer here; nothing to clone",
    "async_write": "--async-write: output shards are written as they fill, while the next tensors merge",
    "write_threads": "--write-threads: output shards are written by one writer here; the value is unused",
    "num_threads": "--num-threads: XLA sizes its own CPU thread pool; the value is unused",
    "verbosity": "-v: drm-jax logs nothing more; its progress bar and summary are its output (--quiet hides them)",
    "allow_crimes": "--allow-crimes: architectures are not compared here; models merge when their tensors' "
                    "names and shapes agree",
    "lora_merge_cache": "--lora-merge-cache: a model+lora reference is applied as its tensors are read; nothing "
                        "is cached, the folder is unused",
    "lora_merge_dtype": "--lora-merge-dtype: LoRA updates are applied in float32; the output takes the config's "
                        "dtype (or out_dtype)",
    "unsafe_serialization": "--no-safe-serialization: the output is safetensors only here (nothing is pickled)",
}

REFUSED = {
    "trust_remote_code": "--trust-remote-code: refused: drm-jax never runs code from a model repository (it reads "
                         "tensors, JSON and tokenizer files only), so there is nothing to trust; drop the flag",
    "unsafe_truncate_embeddings": "--unsafe-truncate-embeddings: refused: embedding rows are never dropped "
                                  "silently here; give the config a tokenizer_source (or a tokenizer: block) to "
                                  "merge models of different vocabularies",
}


def device_name(text: str) -> str | None:
    """An argparse type for --device: drm-jax's cpu / gpu / tpu, or mergekit's cuda, cuda:N, auto (None:
    JAX's default device)."""
    name = text.strip().lower()
    if name.startswith("cuda:") and name[5:].isdigit():
        name = "cuda"
    if name not in _DEVICES:
        raise argparse.ArgumentTypeError(f"{text!r}: not a device; use cpu, gpu (cuda), tpu or auto")
    return _DEVICES[name]


def register_mergekit_options(parser: argparse.ArgumentParser) -> None:
    """Add mergekit-yaml's options that `drm-jax merge` has under no name of its own."""
    group = parser.add_argument_group("mergekit-yaml's options",
                                      "accepted so that mergekit command lines run; each one that changes nothing "
                                      "here says so in one line")
    flag = argparse.BooleanOptionalAction
    group.add_argument("--cuda", action=flag, default=None, help="compute on the GPU: --device gpu")
    group.add_argument("--gpu-rich", action="store_true",
                       help="mergekit's alias of --cuda --low-cpu-memory --read-to-gpu --multi-gpu")
    group.add_argument("--random-seed", type=int, default=None, metavar="N",
                       help="seed of the random methods (DARE, DELLA, ...) where the config gives none")
    group.add_argument("--transformers-cache", default=None, metavar="DIR",
                       help="the Hugging Face cache in which models named org/name[@revision] are found (and "
                            "downloaded to; default HF_HUB_CACHE, else $HF_HOME/hub)")
    for name in ("lazy_unpickle", "low_cpu_memory", "read_to_gpu", "multi_gpu", "clone_tensors", "async_write",
                 "allow_crimes", "trust_remote_code", "unsafe_truncate_embeddings"):
        group.add_argument("--" + name.replace("_", "-"), action=flag, default=None,
                           help=argparse.SUPPRESS if name not in REFUSED else "refused, with the reason")
    group.add_argument("--safe-serialization", action=flag, default=None, help=argparse.SUPPRESS)
    for name in ("lora_merge_cache", "lora_merge_dtype"):
        group.add_argument("--" + name.replace("_", "-"), default=None, metavar="VALUE", help=argparse.SUPPRESS)
    group.add_argument("--write-threads", type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument("--num-threads", "-j", type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0, help=argparse.SUPPRESS)


def apply_mergekit_options(args: argparse.Namespace, note: Callable[[str], None]) -> dict:
    """Check the mergekit options given: refuse (ConfigError) those drm-jax cannot honor, set `args.device`
    from --cuda / --gpu-rich, pass each note to `note`. Returns the keywords of `drm_jax.merge_config` they
    set (random_seed, hub_cache)."""
    for name, reason in REFUSED.items():
        if getattr(args, name):
            raise ConfigError(reason)
    given = {name for name in ("lazy_unpickle", "low_cpu_memory", "read_to_gpu", "multi_gpu", "clone_tensors",
                               "async_write", "allow_crimes") if getattr(args, name)}
    given |= {name for name in ("lora_merge_cache", "lora_merge_dtype", "write_threads", "num_threads")
              if getattr(args, name) is not None}
    if args.verbosity:
        given.add("verbosity")
    if args.safe_serialization is False:
        given.add("unsafe_serialization")
    if args.gpu_rich:
        given |= {"low_cpu_memory", "read_to_gpu", "multi_gpu"}
    if (args.cuda or args.gpu_rich) and args.device is None:
        args.device = "gpu"
        note(f"--{'cuda' if args.cuda else 'gpu-rich'}: computing on the GPU (--device gpu)")
    for name in sorted(given):
        note(NOTES[name])
    return {"random_seed": args.random_seed, "hub_cache": args.transformers_cache}


__all__ = ["apply_mergekit_options", "device_name", "register_mergekit_options"]
