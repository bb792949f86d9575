"""Permutation specs as data, and builders for the Flax models of `drm_jax.permute.models`.

A permutation spec (Git Re-Basin, arXiv 2209.04836; MuDSC, arXiv 2403.01753) lists *groups* of units
that must be transformed together. Each group names every array axis that carries its units:

- an **output** axis belongs to a producer (rows of a linear map, the bias, a norm's scale/bias/statistics):
  there units are merged (`M @ W`);
- an **input** axis belongs to a consumer (columns of the next linear map): there units are unmerged
  (`W @ U`).

Flax layouts are handled here, not by the user: a Dense kernel is (in, out), a Conv kernel is HWIO
(axis 3 = out, axis 2 = in), a multi-head DenseGeneral kernel is (embed, heads, head_dim) for
query/key/value and (heads, head_dim, embed) for the output projection; several consecutive axes are
flattened in C order into one unit axis (unit = head * head_dim + d).

Blocks: attention heads and GroupNorm groups are permuted as whole blocks of `block_size` consecutive
units (units inside a block matched, then blocks matched). Groups with the same `block_link` (the
query/key and value/output groups of one attention layer) share their block permutation.

Activation sites tell where a group's features are observed (usually the input of a consuming layer),
by Flax module path (`module.path`), for the activation-space similarity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from drm_jax.errors import MergeInputError

Role = Literal["out", "in"]
Path = tuple[str, ...]


@dataclass(frozen=True)
class AxisMember:
    """One array axis (or run of consecutive axes) carrying a group's units.

    path: keys from the variables root, e.g. ("params", "Dense_0", "kernel") or
      ("batch_stats", "norm1", "mean").
    axes: consecutive axes flattened in C order into the group's units, e.g. (1,) for a Dense kernel's
      output or (1, 2) for a query kernel (embed, heads, head_dim).
    role: "out" (producer side: merge matrix) or "in" (consumer side: unmerge matrix).
    """

    path: Path
    axes: tuple[int, ...]
    role: Role


@dataclass(frozen=True)
class ActivationSite:
    """Where a group's features are observed: the input or output array of a Flax module call.

    module: Flax module path (`module.path`), e.g. ("Dense_1",) or ("block0", "attn", "out").
    where: "input" (first positional argument) or "output".
    axes: feature axes of that array, flattened in C order into the group's units; every other axis
      counts as samples. (-1,) for channels-last, (-2, -1) for (..., heads, head_dim).
    """

    module: Path
    where: Literal["input", "output"] = "input"
    axes: tuple[int, ...] = (-1,)


@dataclass(frozen=True)
class PermGroup:
    """Units that share one transform (permutation or merge/unmerge pair).

    size: number of units n.
    block_size: units per block (heads: head_dim; GroupNorm: channels per group); 1 = free permutation.
    block_link: groups with the same link share their block-level permutation (one attention layer).
    """

    name: str
    size: int
    members: tuple[AxisMember, ...]
    sites: tuple[ActivationSite, ...] = ()
    block_size: int = 1
    block_link: str | None = None

    @property
    def num_blocks(self) -> int:
        return self.size // self.block_size


@dataclass(frozen=True)
class PermutationSpec:
    """An ordered tuple of `PermGroup`s; a parameter axis belongs to at most one group."""

    groups: tuple[PermGroup, ...]

    def group(self, name: str) -> PermGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(group.name for group in self.groups)

    def members_by_path(self) -> dict[Path, list[tuple[PermGroup, AxisMember]]]:
        """path -> [(group, member)] for every array the spec touches."""
        table: dict[Path, list[tuple[PermGroup, AxisMember]]] = {}
        for group in self.groups:
            for member in group.members:
                table.setdefault(member.path, []).append((group, member))
        return table

    def coordinates(self) -> tuple[tuple[str, ...], ...]:
        """Groups solved together: linked block groups form one coordinate, every other group its own."""
        coords: list[tuple[str, ...]] = []
        seen_links: dict[str, int] = {}
        for group in self.groups:
            if group.block_link is None:
                coords.append((group.name,))
            elif group.block_link in seen_links:
                index = seen_links[group.block_link]
                coords[index] = coords[index] + (group.name,)
            else:
                seen_links[group.block_link] = len(coords)
                coords.append((group.name,))
        return tuple(coords)


# ----------------------------------------------------------------------------------------------------
# Tree access and validation


def get_path(tree: Any, path: Path) -> Any:
    """tree[path[0]][path[1]]...; MergeInputError naming the path when a key is missing."""
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise MergeInputError(f"parameter {'/'.join(path)!s} not found in the variables tree (missing {key!r})")
        node = node[key]
    return node


def normalize_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(axis % ndim for axis in axes)


def validate_spec(spec: PermutationSpec, variables: Any) -> None:
    """Check every member path exists, its axes are consecutive and carry exactly `size` units,
    blocks divide the size, linked groups have the same block count, and no axis is claimed twice."""
    names = spec.names
    if len(set(names)) != len(names):
        raise MergeInputError(f"permutation spec has duplicate group names: {sorted(names)}")
    claimed: dict[tuple[Path, int], str] = {}
    link_blocks: dict[str, int] = {}
    for group in spec.groups:
        if group.size <= 0 or group.block_size <= 0 or group.size % group.block_size:
            raise MergeInputError(
                f"group {group.name}: size {group.size} is not a positive multiple of block_size {group.block_size}"
            )
        if group.block_link is not None:
            expected = link_blocks.setdefault(group.block_link, group.num_blocks)
            if expected != group.num_blocks:
                raise MergeInputError(
                    f"group {group.name}: {group.num_blocks} blocks, but link {group.block_link} has {expected}"
                )
        for member in group.members:
            leaf = get_path(variables, member.path)
            shape = tuple(getattr(leaf, "shape", ()))
            where = f"group {group.name}, parameter {'/'.join(member.path)} {shape}"
            if member.role not in ("out", "in"):
                raise MergeInputError(f"{where}: role must be 'out' or 'in', got {member.role!r}")
            if not member.axes or any(not -len(shape) <= a < len(shape) for a in member.axes):
                raise MergeInputError(f"{where}: axes {member.axes} out of range")
            axes = normalize_axes(member.axes, len(shape))
            if list(axes) != list(range(axes[0], axes[0] + len(axes))):
                raise MergeInputError(f"{where}: axes {member.axes} are not consecutive and increasing")
            units = 1
            for axis in axes:
                units *= shape[axis]
            if units != group.size:
                raise MergeInputError(f"{where}: axes {member.axes} carry {units} units, group size is {group.size}")
            for axis in axes:
                other = claimed.setdefault((member.path, axis), group.name)
                if other != group.name:
                    raise MergeInputError(f"{where}: axis {axis} is already claimed by group {other}")


# ----------------------------------------------------------------------------------------------------
# Builders


def _numbered(names: list[str], pattern: str) -> list[tuple[int, str]]:
    found = []
    for name in names:
        match = re.fullmatch(pattern, name)
        if match:
            found.append((int(match.group(1)), name))
    return sorted(found)


def _params_of(variables: Any) -> Mapping:
    """The params collection of a variables tree, or the tree itself when given bare params."""
    if isinstance(variables, Mapping) and "params" in variables:
        return variables["params"]
    if not isinstance(variables, Mapping):
        raise MergeInputError(f"expected a variables or params mapping, got {type(variables).__name__}")
    return variables


def _rooted(spec: PermutationSpec, variables: Any) -> PermutationSpec:
    """Builders write paths from a {"params": ...} root; for a bare params tree drop that first key."""
    if isinstance(variables, Mapping) and "params" in variables:
        return spec
    groups = []
    for group in spec.groups:
        members = tuple(
            AxisMember(m.path[1:], m.axes, m.role) for m in group.members if m.path[0] == "params"
        )
        groups.append(PermGroup(group.name, group.size, members, group.sites, group.block_size, group.block_link))
    return PermutationSpec(tuple(groups))


def _norm_members(variables: Any, path: Path) -> list[AxisMember]:
    """scale/bias under params (and mean/var under batch_stats when present), all output role."""
    members = []
    params = get_path(_params_of(variables), path)
    for leaf in ("scale", "bias"):
        if leaf in params:
            members.append(AxisMember(("params",) + path + (leaf,), (0,), "out"))
    stats = variables.get("batch_stats", {}) if isinstance(variables, Mapping) else {}
    node: Any = stats
    for key in path:
        node = node.get(key, {}) if isinstance(node, Mapping) else {}
    for leaf in ("mean", "var"):
        if isinstance(node, Mapping) and leaf in node:
            members.append(AxisMember(("batch_stats",) + path + (leaf,), (0,), "out"))
    return members


def _dense_out(path: Path, params: Mapping, axis: int = 1) -> list[AxisMember]:
    members = [AxisMember(("params",) + path + ("kernel",), (axis,), "out")]
    if "bias" in params:
        members.append(AxisMember(("params",) + path + ("bias",), (0,), "out"))
    return members


def mlp_spec(variables: Any, layers: list[str] | None = None) -> PermutationSpec:
    """Spec of a Flax MLP: Dense layers applied in order, elementwise activations between them.

    layers: module names in call order; default: every params entry with a 2-D kernel, ordered by the
      trailing number of its name (Flax's "Dense_0", "Dense_1", ...). One group per hidden layer: the
      layer's kernel axis 1 and bias (out), the next kernel axis 0 (in); features = input of the next layer.
    """
    params = _params_of(variables)
    if layers is None:
        candidates = [
            n for n, p in params.items() if isinstance(p, Mapping) and getattr(p.get("kernel"), "ndim", 0) == 2
        ]
        numbered = _numbered(candidates, r".*?(\d+)")
        layers = [name for _, name in numbered]
    if len(layers) < 2:
        raise MergeInputError(f"MLP spec needs at least two Dense layers, found {layers}")
    groups = []
    for current, following in zip(layers[:-1], layers[1:]):
        size = int(params[current]["kernel"].shape[1])
        members = _dense_out((current,), params[current]) + [
            AxisMember(("params", following, "kernel"), (0,), "in")
        ]
        groups.append(PermGroup(f"{current}.out", size, tuple(members), (ActivationSite((following,)),)))
    return _rooted(PermutationSpec(tuple(groups)), variables)


def resnet_spec(variables: Any, norm_groups: int | None = None) -> PermutationSpec:
    """Spec of `drm_jax.permute.models.ResNet` (BatchNorm or GroupNorm), from its variables' names.

    Layout: "stem_conv", "stem_norm"; blocks "stage{s}_block{b}" with "conv1", "norm1", "conv2", "norm2" and,
    where the shape changes, "proj_conv", "proj_norm"; "head" (Dense on pooled features). Conv kernels HWIO.
    Groups: one per block interior (conv1 out -> conv2 in) and one per residual stream (stem or projection
    shortcut, every conv2/norm2 on it, every conv1/proj_conv/head reading it).
    norm_groups: GroupNorm's num_groups; channels are then permuted in blocks of C // norm_groups.
    """
    params = _params_of(variables)
    block_names = sorted(
        (int(m.group(1)), int(m.group(2)), name)
        for name in params
        if (m := re.fullmatch(r"stage(\d+)_block(\d+)", name))
    )
    if "stem_conv" not in params or "head" not in params or not block_names:
        raise MergeInputError("ResNet spec expects params 'stem_conv', 'stage{s}_block{b}' and 'head'")

    def block_size(channels: int) -> int:
        if norm_groups is None:
            return 1
        if channels % norm_groups:
            raise MergeInputError(f"GroupNorm groups {norm_groups} do not divide {channels} channels")
        return channels // norm_groups

    groups: list[PermGroup] = []
    stream_name = "stem"
    stream_members = _dense_out(("stem_conv",), params["stem_conv"], axis=3) + _norm_members(variables, ("stem_norm",))
    stream_sites: list[ActivationSite] = []
    stream_size = int(params["stem_conv"]["kernel"].shape[3])

    def close_stream() -> None:
        groups.append(
            PermGroup(f"{stream_name}.stream", stream_size, tuple(stream_members), tuple(stream_sites),
                      block_size(stream_size))
        )

    for _, _, name in block_names:
        block = params[name]
        reads = [AxisMember(("params", name, "conv1", "kernel"), (2,), "in")]
        if "proj_conv" in block:
            stream_members.append(AxisMember(("params", name, "proj_conv", "kernel"), (2,), "in"))
        stream_members.extend(reads)
        stream_sites.append(ActivationSite((name, "conv1")))
        if "proj_conv" in block:
            close_stream()
            stream_name = name
            stream_size = int(block["proj_conv"]["kernel"].shape[3])
            stream_members = _dense_out((name, "proj_conv"), block["proj_conv"], axis=3) + _norm_members(
                variables, (name, "proj_norm")
            )
            stream_sites = []
        inner = int(block["conv1"]["kernel"].shape[3])
        inner_members = (
            _dense_out((name, "conv1"), block["conv1"], axis=3)
            + _norm_members(variables, (name, "norm1"))
            + [AxisMember(("params", name, "conv2", "kernel"), (2,), "in")]
        )
        groups.append(PermGroup(f"{name}.inner", inner, tuple(inner_members), (ActivationSite((name, "conv2")),),
                                block_size(inner)))
        stream_members.extend(_dense_out((name, "conv2"), block["conv2"], axis=3))
        stream_members.extend(_norm_members(variables, (name, "norm2")))
    stream_members.append(AxisMember(("params", "head", "kernel"), (0,), "in"))
    stream_sites.append(ActivationSite(("head",)))
    close_stream()
    return _rooted(PermutationSpec(tuple(groups)), variables)


def vit_spec(variables: Any) -> PermutationSpec:
    """Spec of `drm_jax.permute.models.ViT` (pre-LayerNorm blocks, Flax MultiHeadDotProductAttention).

    Layout: "embed" (Dense on patches), "pos_embed" (1, tokens, width), blocks "block{i}" with "ln1",
    "attn" (query/key/value kernels (width, heads, head_dim), out kernel (heads, head_dim, width)), "ln2",
    "mlp_in", "mlp_out"; "ln_final"; "head".
    Groups: the residual stream (one group across all layers), per block a query/key group and a
    value/output group linked so heads move as whole blocks together, and the MLP hidden units.
    """
    params = _params_of(variables)
    blocks = [name for _, name in _numbered(list(params), r"block(\d+)")]
    if "embed" not in params or "head" not in params or not blocks:
        raise MergeInputError("ViT spec expects params 'embed', 'block{i}' and 'head'")
    width = int(params["embed"]["kernel"].shape[1])
    stream = _dense_out(("embed",), params["embed"])
    if "pos_embed" in params:
        stream.append(AxisMember(("params", "pos_embed"), (-1,), "out"))
    sites: list[ActivationSite] = []
    groups: list[PermGroup] = []
    for name in blocks:
        block = params[name]
        attn = block["attn"]
        _, heads, head_dim = (int(d) for d in attn["query"]["kernel"].shape)
        stream.extend(_norm_members(variables, (name, "ln1")))
        stream.extend(AxisMember(("params", name, "attn", p, "kernel"), (0,), "in") for p in ("query", "key", "value"))
        stream.extend(_dense_out((name, "attn", "out"), attn["out"], axis=2))
        stream.extend(_norm_members(variables, (name, "ln2")))
        stream.append(AxisMember(("params", name, "mlp_in", "kernel"), (0,), "in"))
        stream.extend(_dense_out((name, "mlp_out"), block["mlp_out"]))
        sites.extend([ActivationSite((name, "ln1")), ActivationSite((name, "ln2"))])

        def head_members(proj: str) -> list[AxisMember]:
            members = [AxisMember(("params", name, "attn", proj, "kernel"), (1, 2), "out")]
            if "bias" in attn[proj]:
                members.append(AxisMember(("params", name, "attn", proj, "bias"), (0, 1), "out"))
            return members

        units = heads * head_dim
        link = f"{name}.heads"
        groups.append(PermGroup(
            f"{name}.qk", units, tuple(head_members("query") + head_members("key")),
            (ActivationSite((name, "attn", "query"), "output", (-2, -1)),
             ActivationSite((name, "attn", "key"), "output", (-2, -1))),
            head_dim, link,
        ))
        groups.append(PermGroup(
            f"{name}.vo", units,
            tuple(head_members("value") + [AxisMember(("params", name, "attn", "out", "kernel"), (0, 1), "in")]),
            (ActivationSite((name, "attn", "out"), "input", (-2, -1)),), head_dim, link,
        ))
        hidden = int(block["mlp_in"]["kernel"].shape[1])
        groups.append(PermGroup(
            f"{name}.mlp", hidden,
            tuple(_dense_out((name, "mlp_in"), block["mlp_in"])
                  + [AxisMember(("params", name, "mlp_out", "kernel"), (0,), "in")]),
            (ActivationSite((name, "mlp_out")),),
        ))
    if "ln_final" in params:
        stream.extend(_norm_members(variables, ("ln_final",)))
        sites.append(ActivationSite(("ln_final",)))
    stream.append(AxisMember(("params", "head", "kernel"), (0,), "in"))
    if "ln_final" not in params:
        sites.append(ActivationSite(("head",)))
    groups.insert(0, PermGroup("stream", width, tuple(stream), tuple(sites)))
    return _rooted(PermutationSpec(tuple(groups)), variables)
