"""Which leaves go through DRM, which take the other path, which keep their base value.

Roles are decided on the dotted leaf name and the shape, by patterns (regular expressions searched in
the name), as data: the default exclusions (`DEFAULT_EXCLUDE`, derived from the architecture table in
`drm_jax.arch`) are the token embeddings, position embeddings and LM heads of the common architectures
(BERT, GPT-2, Llama, T5, ViT, CLIP, OPT, GPT-NeoX, Flax `Embed`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

from drm_jax.arch import DEFAULT_EXCLUDE, EMBEDDING_AND_HEAD_NAMES
from drm_jax.errors import MergeInputError, quote
from drm_jax.numbers import is_floating

Role = Literal["matrix", "other", "ignore", "not_floating"]

# layout name -> whether a 2-D linear weight is stored (in, out) and must be transposed to (out, in)
LAYOUTS = {"torch": False, "flax": True}
Orientation = Callable[[str, tuple[int, ...]], bool]


def flax_named(name: str, shape: tuple[int, ...] = ()) -> bool:
    """The layout of a tree given none: a leaf named `kernel` (Flax's Dense, a T5X checkpoint) is stored
    (in, out); any other 2-D weight (`weight`: PyTorch, Hugging Face) is (out, in)."""
    return name.rsplit(".", 1)[-1] == "kernel"


@dataclass(frozen=True)
class LeafRole:
    role: Role
    transpose: bool  # stored (in, out): transposed to (out, in) before DRM and back after


def _compile(patterns: Sequence[str] | str | None, what: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise MergeInputError(f"{what} pattern {p!r} is not a valid regular expression: {err}") from None
    return compiled


class RoleRules:
    """include / exclude / ignore patterns and the layout, applied to (name, shape, dtype).

    include: patterns a 2-D weight must match to go through DRM (default: every 2-D weight).
    exclude: patterns that keep a 2-D weight out of DRM (default: `DEFAULT_EXCLUDE`); such leaves take
      the other path. Pass [] to send embeddings through DRM too.
    ignore: patterns whose leaves keep their base value (docs/methods.md#leaf-roles).
    layout: None (default: from the names, `flax_named`: leaves named `kernel` are (in, out), the others
      (out, in)), "torch" (2-D weights are (out, in)), "flax" (2-D kernels are (in, out)), or a callable
      (name, shape) -> True where the stored weight is (in, out) (e.g. GPT-2's Conv1D).
    """

    def __init__(self, include=None, exclude=DEFAULT_EXCLUDE, ignore=None, layout: str | Orientation | None = None):
        self.include = _compile(include, "include")
        self.exclude = _compile(exclude, "exclude")
        self.ignore = _compile(ignore, "ignore")
        if layout is None:
            self.transposed = flax_named
        elif callable(layout):
            self.transposed = layout
        elif layout in LAYOUTS:
            flag = LAYOUTS[layout]
            self.transposed = lambda name, shape: flag
        else:
            raise MergeInputError(f"unknown layout {layout!r}; expected 'torch', 'flax' or a callable")

    def __call__(self, name: str, shape: tuple[int, ...], dtype) -> LeafRole:
        if not is_floating(dtype):
            return LeafRole("not_floating", False)  # integer buffers (position ids, step counters), RNG keys
        if any(p.search(name) for p in self.ignore):
            return LeafRole("ignore", False)
        if len(shape) == 2 and (not self.include or any(p.search(name) for p in self.include)) and not any(
            p.search(name) for p in self.exclude
        ):
            return LeafRole("matrix", bool(self.transposed(name, shape)))
        return LeafRole("other", False)

    def unmatched(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """(include / exclude / ignore, pattern) of each given pattern that matches none of `names`: a typo
        that would change the merge without a word. The default exclusions (`DEFAULT_EXCLUDE`) are exempt:
        they name the embeddings and heads of many architectures, most of which a given model lacks."""
        return [(what, p.pattern) for what, compiled in (("include", self.include), ("exclude", self.exclude),
                                                         ("ignore", self.ignore))
                for p in compiled if p.pattern not in DEFAULT_EXCLUDE and not any(p.search(n) for n in names)]

    def check_matched(self, names: Sequence[str]) -> None:
        """MergeInputError naming the first given pattern that matches no leaf name (`unmatched`)."""
        missed = self.unmatched(names)
        if missed:
            what, pattern = missed[0]
            raise MergeInputError(unmatched_message(what, pattern, names, "leaf name"))


def unmatched_message(what: str, pattern: str, names: Sequence[str], noun: str) -> str:
    example = f" (names look like {quote(names[0])})" if names else ""
    return f"{what} pattern {quote(pattern)} matches no {noun}{example}; correct or remove it"


__all__ = ["DEFAULT_EXCLUDE", "EMBEDDING_AND_HEAD_NAMES", "Role", "RoleRules", "unmatched_message"]
