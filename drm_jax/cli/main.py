"""Entry point of the `drm-jax` console script.

Each subcommand lives in its own module exposing `register(subparsers)`, which adds its parser and sets
`func` (a callable taking the parsed arguments and returning an exit code). Errors a user can cause are
`DrmJaxError`s: they are printed as one line on stderr, with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from drm_jax.errors import DrmJaxError

# Subcommand modules, imported lazily so `drm-jax --help` stays fast and one broken optional
# dependency does not take the other subcommands down.
_SUBCOMMANDS = ("merge", "convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drm-jax",
        description="Merge fine-tuned models (DRM, TIES, DARE, KnOTS, ...) and convert checkpoints, in JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"drm_jax.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"drm_jax.cli.{name}":
                raise
            continue  # subcommand not built yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DrmJaxError as err:
        print(f"drm-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("drm-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
