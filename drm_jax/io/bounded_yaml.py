"""YAML read with bounds: a document whose aliases expand past a limit is refused before it is built.

PyYAML builds `&a [*a, *a, ...]` nested ten deep (a few hundred bytes) into a billion references and
unbounded memory; here the composed node graph (aliases still shared, cheap) is measured first, counting
each node once per place it appears, and only a document within `max_nodes` is constructed. Recursive
aliases, nesting too deep for the parser and numbers too long to convert are refused too.
"""

from __future__ import annotations

from typing import Any

import yaml

# Places a value may appear in a document once aliases are expanded (a merge config has a few hundred).
MAX_NODES = 100_000
# A long string scalar weighs one node per this many characters.
CHARACTERS_PER_NODE = 100


class YamlBoundError(ValueError):
    """A YAML document beyond the bounds (the message says which and where)."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _expanded_size(root: yaml.Node, max_nodes: int) -> int:
    """Nodes of the document with every alias expanded, computed on the shared graph (each distinct node
    visited once); raises YamlBoundError past `max_nodes` or on a recursive alias."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            own = 1 + (len(node.value) // CHARACTERS_PER_NODE if isinstance(node, yaml.ScalarNode) else 0)
            sizes[key] = own + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > max_nodes:
                line = node.start_mark.line + 1 if node.start_mark is not None else "?"
                raise YamlBoundError(f"the value at line {line} expands to more than {max_nodes} values "
                                     f"(YAML aliases); refused")
            continue
        if key in sizes:
            continue
        if key in on_path:
            line = node.start_mark.line + 1 if node.start_mark is not None else "?"
            raise YamlBoundError(f"recursive YAML alias at line {line}; refused")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    return sizes[id(root)]


def _construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    try:
        return loader.construct_document(node)
    except RecursionError:
        raise YamlBoundError("nested too deeply to build; refused") from None
    except ValueError as err:  # int() of a number with more digits than Python converts
        raise YamlBoundError(f"a value cannot be converted: {str(err)[:120]}") from None


def load_bounded_yaml(text: str, max_nodes: int = MAX_NODES) -> Any:
    """yaml.safe_load(text), refusing documents that expand past `max_nodes` values.

    Raises:
      yaml.YAMLError: not valid YAML (with its problem mark).
      YamlBoundError: too large once expanded, a recursive alias, nesting too deep, a number too long.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YamlBoundError("nested too deeply to parse; refused") from None
        if node is None:
            return None
        _expanded_size(node, max_nodes)
        return _construct(loader, node)
    finally:
        loader.dispose()


def load_bounded_documents(text: str, max_nodes: int = MAX_NODES) -> list[Any]:
    """yaml.safe_load_all(text) as a list, with `load_bounded_yaml`'s bounds over all documents together
    (a multi-stage merge config is several documents separated by `---`).

    Raises:
      as `load_bounded_yaml`.
    """
    loader = yaml.SafeLoader(text)
    documents, total = [], 0
    try:
        while True:
            try:
                if not loader.check_node():
                    break
                node = loader.get_node()
            except RecursionError:
                raise YamlBoundError("nested too deeply to parse; refused") from None
            if node is None:
                documents.append(None)
                continue
            total += _expanded_size(node, max_nodes - total)
            documents.append(_construct(loader, node))
    finally:
        loader.dispose()
    return documents


__all__ = ["MAX_NODES", "YamlBoundError", "load_bounded_documents", "load_bounded_yaml"]
