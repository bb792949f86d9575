"""Exceptions shared by every layer of drm_jax.

Every error a user can cause (bad input, bad checkpoint, bad config) is a `DrmJaxError`, so the command
line can print it as one line and exit non-zero without a traceback. The message names the file, the
tensor (leaf path) or the key, and says what is wrong.
"""

from __future__ import annotations

import contextlib
import os
import reprlib
import unicodedata

# Longest error message: any longer is cut in the middle (its start names the file, its end says what
# is wrong). A message is one line whatever it quotes (see `one_line`).
MESSAGE_LIMIT = 1000
# Longest path quoted in a message; a longer one keeps its start and its file name.
PATH_LIMIT = 300
# Longest quotation of a user's value in an error message: enough to recognise it, never a flood (a YAML
# alias bomb expands a few hundred bytes into hundreds of megabytes).
QUOTE_LIMIT = 80
# Characters that could end a line, forge another one or hide text in a terminal: control and format
# characters, line and paragraph separators, lone surrogates (undecodable bytes of a file name).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def escape_controls(text: str) -> str:
    """`text` with every unsafe character (see _UNSAFE_CATEGORIES) written as its Python escape (`\\n`,
    `\\x1b`, `\\u2028`, `\\udcff`), so it prints as one line and shows what is there."""
    if text.isprintable():
        return text
    return "".join(c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in text)


def _cut_middle(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = max(1, limit * 2 // 3)
    tail = max(1, limit - head - 5)
    return f"{text[:head]} ... {text[-tail:]}"


def one_line(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """str(text) as one line of at most about `limit` characters: unsafe characters escaped
    (`escape_controls`), a longer text cut in the middle (" ... " marks the cut)."""
    text = _cut_middle(str(text), limit)  # before escaping: escaping a megabyte would cost a megabyte
    return _cut_middle(escape_controls(text), limit)


def clip(text: object, limit: int = QUOTE_LIMIT) -> str:
    """A name or key as it is (no quotes), its control characters escaped (`escape_controls`), cut to
    `limit` characters ("..." marks a cut)."""
    text = str(text)
    shown = escape_controls(text[:limit + 1])  # one more than fits: a longer text is marked as cut
    return shown if len(text) <= limit and len(shown) <= limit else shown[: limit - 3] + "..."


def quote_path(path: str | os.PathLike, limit: int = PATH_LIMIT) -> str:
    """A file system path for a message: as it is when it is short and printable; escaped (`escape_controls`)
    and cut in the middle (keeping the file name) otherwise."""
    return one_line(os.fspath(path) if isinstance(path, os.PathLike) else path, limit)


class DrmJaxError(Exception):
    """Base class of the errors drm_jax raises on bad input. Its message is always one bounded line
    (`one_line`), whatever values it quotes."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class MergeInputError(DrmJaxError, ValueError):
    """The models given to a merge do not fit together (structure, shape, NaN/Inf, parameters)."""


class AdapterMethodError(MergeInputError):
    """A merge method whose merged model is not base + a function of the task vectors, asked to merge LoRA
    adapters into one adapter (`drm_jax.merge_adapters`, `drm-jax merge --adapter-out`)."""


class CheckpointError(DrmJaxError, OSError):
    """A checkpoint cannot be read or written (missing, truncated, corrupt, unknown format)."""


class UnsafeFileError(CheckpointError):
    """A file of a model that is refused outright, never taken for a missing one: a symbolic link out of
    its model directory (drm_jax.io.model_files), or custom code a tokenizer or config would need to run."""


class ConfigError(DrmJaxError, ValueError):
    """A merge configuration is invalid (YAML, unknown method or parameter)."""


@contextlib.contextmanager
def os_errors_named(where: str | os.PathLike):
    """Inside, an OSError that is no DrmJaxError (an unwritable output directory, a full disk) becomes a
    CheckpointError naming its file (else `where`): one line, no traceback."""
    try:
        yield
    except OSError as err:
        if isinstance(err, DrmJaxError):
            raise
        raise CheckpointError(f"{err.filename or where}: {err.strerror or err}") from None



def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """repr(value) cut to about `limit` characters, computed without building the whole repr.

    Strings are cut before quoting; containers show their first few items and levels ("..." marks a cut).
    """
    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 6
    short.maxlevel = 3
    text = short.repr(value)
    return text if len(text) <= limit + 3 else text[:limit] + "..."
