"""YAML loading that remembers where every key came from, so recipe errors can point at a line."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import GGMergeError


class Node(dict):
    """A mapping from the recipe that knows its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict
    #: (key, line) of each key given again in this mapping: the last value wins, as in PyYAML
    duplicates: list = ()

    def line_of(self, key) -> int:
        return self.key_lines.get(key, self.line)


class Seq(list):
    line: int = 0
    item_lines: list


class _Loader(yaml.SafeLoader):
    pass


def _mapping(loader: _Loader, node: yaml.MappingNode) -> Node:
    out = Node()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    out.duplicates = []
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            # PyYAML (and so mergekit) keeps the last value silently; the recipe layer warns
            out.duplicates.append((key, key_node.start_mark.line + 1))
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> Seq:
    out = Seq(loader.construct_object(n, deep=True) for n in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [n.start_mark.line + 1 for n in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)


def load_documents(text: str, path: str | Path) -> list[Node]:
    """All YAML documents of a recipe (mergekit-multi uses ``---`` separated documents)."""
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        col = f" (column {mark.column + 1})" if mark else ""
        raise GGMergeError(f"invalid YAML: {exc.problem or exc}{col}", path=path,
                           line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise GGMergeError(f"invalid YAML: {exc}", path=path) from None
    if not docs:
        raise GGMergeError("recipe is empty", path=path)
    for d in docs:
        if not isinstance(d, Node):
            raise GGMergeError(
                f"each YAML document must be a mapping of recipe keys, got {type(d).__name__}", path=path
            )
    return docs
