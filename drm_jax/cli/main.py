"""Entry point of the `drm-jax` console script.

Each subcommand lives in its own module exposing `register(subparsers)`, which adds its parser and sets
`func` (a callable taking the parsed arguments and returning an exit code). Errors a user can cause are
`DrmJaxError`s: they are printed as one line on stderr, with exit status 2 and no traceback; so are an
OSError from the system (a full disk, a read-only directory) and input nested too deeply to parse.

SIGINT and SIGTERM are handled alike: the command unwinds, every temporary directory is removed (outputs
appear only whole, by a rename), and the exit status is 128 + the signal number: 130 for SIGINT, 143 for
SIGTERM. A second signal during that cleanup is ignored.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from drm_jax.errors import DrmJaxError, one_line, quote_path
from drm_jax.io.writer import abort_unfinished

# Subcommand modules, imported lazily so `drm-jax --help` stays fast and one broken optional
# dependency does not take the other subcommands down.
_SUBCOMMANDS = ("merge", "convert", "methods", "extract_lora")


class OneLineParser(argparse.ArgumentParser):
    """argparse with the refusal contract: a bad argument is one line on stderr (no usage block) naming the
    subcommand and pointing at its --help, exit status 2. Subcommand parsers are of this class too."""

    def error(self, message: str):
        print_error(f"{self.prog}: {message} (see {self.prog} --help)")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so every `with` block cleans up the same way."""


def _on_signal(signum, frame) -> None:
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)  # the cleanup that follows must not be cut short
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _redeliver_unraisable(previous_hook):
    """sys.unraisablehook that takes back our own interrupt where Python could not raise it.

    A signal that arrives while Python runs a callback it cannot raise from (JAX's garbage-collection
    callback, a finalizer) would be printed as "Exception ignored ..." with a traceback and lost, and the
    merge would go on with signals ignored. Instead the handler is put back and the signal sent again: it
    is raised at the next point where an exception can propagate. It is sent from a short-lived thread a
    moment later, not from the hook: sent here, the handler would run inside the hook, and its exception
    would be printed and lost in the same way (each loss comes back here and sends it again)."""

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signum = signal.SIGTERM if isinstance(unraisable.exc_value, Terminated) else signal.SIGINT
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, _on_signal)
            threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
            return
        previous_hook(unraisable)

    return hook


def print_error(message: object) -> None:
    """The one line of a refusal on stderr. The last defence of that contract: whatever the message
    quotes, it is escaped and cut to one bounded line (`drm_jax.errors.one_line`)."""
    print(f"drm-jax: error: {one_line(message)}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except DrmJaxError as err:
        print_error(err)
        return 2
    except OSError as err:  # the system's, not ours: a full disk, a read-only or vanished directory
        where = f"{quote_path(err.filename)}: " if getattr(err, "filename", None) else ""
        print_error(f"{where}{err.strerror or err}")
        return 2
    except RecursionError:
        print("drm-jax: error: input nested too deeply to parse", file=sys.stderr)
        return 2
    except Terminated:
        abort_unfinished()
        print("drm-jax: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        abort_unfinished()
        print("drm-jax: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        abort_unfinished()  # a failure of any kind leaves no temporary directory


def main(argv: list[str] | None = None, *, restore_signals: bool = True) -> int:
    """Run `drm-jax ARGV`; returns the exit status. restore_signals: put the caller's SIGINT / SIGTERM
    handlers back at the end (an in-process caller); False: the process is about to exit (`console`), so
    a signal arriving after the work is done is ignored instead of killing the process by its default
    action (a finished merge, its output complete, would then exit -15)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _run(args)
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _redeliver_unraisable(previous_hook)
    try:
        return _run(args)
    finally:
        sys.unraisablehook = previous_hook
        for s, handler in previous.items():
            signal.signal(s, handler if restore_signals else signal.SIG_IGN)


def console() -> int:
    """The `drm-jax` console script and `python -m drm_jax.cli.main`."""
    return main(restore_signals=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console())
