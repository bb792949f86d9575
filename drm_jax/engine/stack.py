"""Grouping same-shaped leaves and stacking them on a leading layer axis.

All leaves with the same role and (out, in) shape, e.g. the 32 `q_proj` weights of a Llama model, form
one group; a group is cut into chunks of at most `max_layers` layers. A 32-layer model then compiles once per distinct
(role, shape), a handful of times, not once per leaf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator



@dataclass
class Group:
    role: str
    shape: tuple[int, ...]  # canonical shape: (out, in) for linear weights
    members: list[int] = field(default_factory=list)  # leaf indices, in leaf order


def group_leaves(roles: list[str], shapes: list[tuple[int, ...]]) -> list[Group]:
    """Groups of leaf indices by (role, canonical shape), in order of first appearance."""
    groups: dict[tuple[str, tuple[int, ...]], Group] = {}
    for index, (role, shape) in enumerate(zip(roles, shapes)):
        key = (role, tuple(shape))
        if key not in groups:
            groups[key] = Group(role, tuple(shape))
        groups[key].members.append(index)
    return list(groups.values())


def chunk_length(num_layers: int, bytes_per_layer: int, budget_bytes: int | None) -> int:
    """Layers per call: all of them within the budget, else equal chunks that fit (at least 1)."""
    if budget_bytes is None or num_layers * bytes_per_layer <= budget_bytes:
        return num_layers
    per_call = max(1, budget_bytes // max(1, bytes_per_layer))
    calls = math.ceil(num_layers / per_call)
    return math.ceil(num_layers / calls)  # balance chunks so padding stays small


def chunks(members: list[int], length: int) -> Iterator[list[int]]:
    for start in range(0, len(members), length):
        yield members[start:start + length]


__all__ = ["Group", "chunk_length", "chunks", "group_leaves"]
