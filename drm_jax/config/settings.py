"""mergekit's parameter settings: one value, a gradient over the layers, or a filter list on tensor names.

A config may give a parameter as

- one value: `weight: 0.5`;
- a gradient: `t: [0, 0.5, 0.3, 0.7, 1]`, interpolated linearly over the layer position t in [0, 1] of each
  tensor (t = i / (n - 1) for layer i of a slice of n layers, 1 for a slice of one layer, 0 for the
  tensors before and after the layers): with s = t (len - 1), i0 = floor(s), the value is
  (1 - (s - i0)) v[i0] + (s - i0) v[min(i0 + 1, len - 1)];
- a filter list: `weight: [{filter: mlp, value: 0.5}, {value: 0}]`: the first entry whose filter is a
  substring of the tensor's name (no filter, or "*", matches every tensor) gives the value, itself one
  value or a gradient; no match gives nothing (the next scope, then the default, applies). A single
  mapping `{filter: ..., value: ...}` is a list of one.

Precedence (mergekit's `ConfigReader`): for a per-model parameter, the model's own entry (a slice
source's `parameters`, or `models[i].parameters`), then the slice's `parameters`, the module's, the
top-level `parameters`; for a shared parameter the same without the model's entry. The first scope that
has the name and gives a value wins. Per-model values match filters against the model's own tensor name
(its layer index within its `layer_range`), shared ones against the output tensor's name.

Only traced parameters may vary per tensor: a gradient or filter list on a static (structural) parameter
is refused by name (docs/methods.md#per-tensor-parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from drm_jax.errors import clip, quote
from drm_jax.numbers import is_finite_number

CONDITION_KEYS = ("filter", "value")


@dataclass(frozen=True)
class Gradient:
    """Values interpolated over the layer position t (mergekit's list of numbers)."""

    values: tuple[float, ...]

    def at(self, t: float) -> float:
        n = len(self.values)
        scaled = t * (n - 1)
        i0 = int(scaled)
        i1 = min(n - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * self.values[i0] + frac * self.values[i1]


@dataclass(frozen=True)
class Conditional:
    """One entry of a filter list: a substring of tensor names (None: every tensor) and its value."""

    filter: str | None
    value: Any  # one value or a Gradient

    def matches(self, tensor_name: str) -> bool:
        return self.filter is None or self.filter == "*" or bool(tensor_name and self.filter in tensor_name)


@dataclass(frozen=True)
class FilterList:
    entries: tuple[Conditional, ...]


def per_tensor(value: Any) -> bool:
    """Whether a checked setting can take a different value per tensor."""
    return isinstance(value, (Gradient, FilterList))


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of a checked setting for one tensor at layer position t, or None (a filter list with no
    matching entry)."""
    if isinstance(setting, FilterList):
        for entry in setting.entries:
            if entry.matches(tensor_name):
                return evaluate(entry.value, tensor_name, t)
        return None
    if isinstance(setting, Gradient):
        return setting.at(t)
    return setting


def check_setting(value: Any, key: str, check: Callable[[Any, str], Any], *, varying: bool, name: str) -> Any:
    """A setting as written -> one checked value, a `Gradient` or a `FilterList` (values checked by
    `check(value, key)`, which raises ValueError naming the key).

    varying: whether the parameter may vary per tensor (traced); a gradient or filter list on a static one
    raises ValueError naming the key.
    """
    if isinstance(value, (list, dict)):
        if not varying:
            raise ValueError(f"{key}: {name} is structural (static): one value for every tensor, not a "
                             f"{'filter list' if isinstance(value, dict) or _has_mappings(value) else 'gradient'}"
                             f"; got {quote(value)}")
        return _varying(value, key, check)
    return check(value, key)


def _has_mappings(value: list) -> bool:
    return any(isinstance(e, dict) for e in value)


def _gradient(value: list, key: str, check: Callable[[Any, str], Any]) -> Gradient:
    if not value:
        raise ValueError(f"{key}: an empty gradient; give at least one value")
    for i, v in enumerate(value):
        if isinstance(v, (list, dict)):
            raise ValueError(f"{key}[{i}]: a gradient holds numbers, got {quote(v)}")
        if not is_finite_number(v):
            raise ValueError(f"{key}[{i}]: a gradient holds finite numbers, got {quote(v)}")
    return Gradient(tuple(check(v, f"{key}[{i}]") for i, v in enumerate(value)))


def _varying(value: Any, key: str, check: Callable[[Any, str], Any]) -> Any:
    if isinstance(value, dict):
        return FilterList((_conditional(value, key, check),))
    if not _has_mappings(value):
        return _gradient(value, key, check)
    if not all(isinstance(e, dict) for e in value):
        bad = next(i for i, e in enumerate(value) if not isinstance(e, dict))
        raise ValueError(f"{key}[{bad}]: a filter list holds mappings {{filter: ..., value: ...}}, got "
                         f"{quote(value[bad])}")
    return FilterList(tuple(_conditional(e, f"{key}[{i}]", check) for i, e in enumerate(value)))


def _conditional(entry: dict, key: str, check: Callable[[Any, str], Any]) -> Conditional:
    unknown = sorted((k for k in entry if k not in CONDITION_KEYS), key=str)
    if unknown:
        raise ValueError(f"{key}.{clip(unknown[0])}: unknown key; a filter entry has 'filter' and 'value'")
    if "value" not in entry:
        raise ValueError(f"{key}.value: missing")
    flt = entry.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ValueError(f"{key}.filter: must be a substring of tensor names, got {quote(flt)}")
    value = entry["value"]
    if isinstance(value, dict):
        raise ValueError(f"{key}.value: one value or a gradient, not a nested filter, got {quote(value)}")
    value = _gradient(value, f"{key}.value", check) if isinstance(value, list) else check(value, f"{key}.value")
    return Conditional(flt, value)


def resolve(name: str, scopes: Iterable[Mapping[str, Any] | None], tensor_name: str, t: float) -> Any:
    """The value of `name` for one tensor: the first scope (highest precedence first) that has it and gives
    a value; None where none does."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor_name, t)
            if value is not None:
                return value
    return None


def has_per_tensor(*scopes: Mapping[str, Any] | None) -> bool:
    """Whether any scope holds a gradient or a filter list."""
    return any(per_tensor(v) for scope in scopes if scope for v in scope.values())


__all__ = ["FilterList", "Gradient", "check_setting", "has_per_tensor", "resolve"]
