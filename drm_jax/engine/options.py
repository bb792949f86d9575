"""`MergeOptions`: how a merge is planned and run, shared by every entry point.

`drm_jax.merge`, `drm_jax.prepare`, `drm_jax.merge_adapters` and the streaming `merge_leaves` take the
method's own parameters as keywords and everything else in one options object. The documented keywords
(`layout=`, `include=`, `mesh=`, ...) still work: `split_keywords` packs them into the options, the one
place that knows which keyword is an option; every other keyword must be a parameter of the method, or
the entry point raises MergeInputError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Sequence

import jax

from drm_jax.engine import roles as roles_lib
from drm_jax.errors import MergeInputError
from drm_jax.methods.base import MethodSpec

# Stacked inputs of one call, in bytes, before a group is cut into chunks (None: no limit).
DEFAULT_GROUP_BYTES = 2 * 2**30


@dataclass(frozen=True)
class MergeOptions:
    """Planning and execution options of a merge (none of them is a number of the method).

    layout: None (default: from the leaf names: a leaf named `kernel` is Flax's (in, out), any other 2-D
      weight (out, in)), "torch" (2-D weights stored (out, in)), "flax" (stored (in, out)), or a callable
      (name, shape) -> True for weights stored (in, out). Directions refer to (out, in).
    include / exclude: regex patterns on dotted leaf names selecting the 2-D weights of the method's
      linear path (default: all 2-D weights but embeddings and LM heads, `roles.DEFAULT_EXCLUDE`).
    ignore: patterns of leaves that keep their base value. A given pattern that matches no leaf name is a
      MergeInputError naming it (the default exclusions excepted).
    max_group_bytes: the memory budget: stacked groups are cut into chunks whose inputs stay under this
      many bytes (default 2 GiB; None: no limit).
    compute_dtype: mergekit's `dtype`: None (float32, float64 for float64 leaves under x64), "float32",
      "float64", "float16" or "bfloat16" (docs/methods.md#compute-dtype).
    mesh: a `jax.sharding.Mesh`: stacked layers are split over its devices (`drm_jax.engine.shard`).
    """

    layout: str | Callable[[str, tuple], bool] | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = roles_lib.DEFAULT_EXCLUDE
    ignore: Sequence[str] | None = None
    max_group_bytes: int | None = DEFAULT_GROUP_BYTES
    compute_dtype: str | None = None
    mesh: jax.sharding.Mesh | None = None


OPTION_NAMES = frozenset(f.name for f in fields(MergeOptions))


def split_keywords(keywords: dict[str, Any], options: MergeOptions | None = None) -> tuple[MergeOptions, dict]:
    """(options, the method's keywords): the option keywords packed into `options` (default MergeOptions()).

    A keyword given as None is "not given" (the method's default), except where None is a value of the
    parameter; the method's keywords are checked by `method_params`.
    """
    if options is not None and not isinstance(options, MergeOptions):
        raise MergeInputError(f"options must be a MergeOptions, got {type(options).__name__}")
    given = {k: v for k, v in keywords.items() if k in OPTION_NAMES}
    rest = {k: v for k, v in keywords.items() if k not in OPTION_NAMES}
    return replace(options or MergeOptions(), **given), rest


def method_params(spec: MethodSpec, keywords: dict[str, Any]) -> dict[str, Any]:
    """The keywords that are the method's parameters, None meaning "not given" for the ones where None is
    no value. Unknown names are left in: `split_params` raises on them, naming the keyword."""
    optional = {n for p in spec.params if p.optional for n in (p.name,) + p.aliases}
    return {k: v for k, v in keywords.items() if v is not None or k in optional}


__all__ = ["DEFAULT_GROUP_BYTES", "MergeOptions", "method_params", "split_keywords"]
