"""Scenario YAML, read strictly and bounded before it is expanded.

``yaml.safe_load`` accepts what a scenario must not: duplicate keys (the last silently wins),
nesting deep enough to raise RecursionError in PyYAML's recursive composer, and aliases that
expand exponentially (nine anchors of nine aliases each are 9^9 values: a 324-byte file that
took over a minute and 5 GB in the schema's copy of the data). Here, in order:

1. the file is at most :data:`MAX_FILE_BYTES` and strict UTF-8;
2. the composer refuses nesting deeper than :data:`MAX_DEPTH` as it descends (a bounded parse:
   it never recurses further);
3. the composed node graph, in which an alias is a shared node, is measured as it would expand,
   memoized per node, and refused above :data:`MAX_EXPANDED_NODES` values or when it is recursive;
4. only then are Python objects constructed, refusing duplicate keys.

Every refusal is one ConfigError line: ``<file>:<line>:<column>: <problem>``.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nmoe.errors import ConfigError

MAX_FILE_BYTES = 256 * 1024  # the shipped scenarios are 1-3 KB
MAX_DEPTH = 32  # the deepest scenario key path is 5 levels (channel.clients.<id>.uplink.rate)
MAX_EXPANDED_NODES = 20_000  # values after alias expansion; the shipped scenarios have under 200
_MERGE = "tag:yaml.org,2002:merge"


def _where(name: str, mark: yaml.Mark | None) -> str:
    return name if mark is None else f"{name}:{mark.line + 1}:{mark.column + 1}"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with a nesting bound in the composer and no duplicate keys in the constructor."""

    def __init__(self, text: str, name: str) -> None:
        super().__init__(text)
        self.name = name
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:  # index: int or key node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"{_where(self.name, mark)}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[object, yaml.Mark] = {}
        for key_node, _value in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE:
                continue  # merged keys (<<) may be overridden on purpose; other keys fail later
            key = self.construct_object(key_node)
            if key in seen:
                first = seen[key].line + 1
                raise ConfigError(
                    f"{_where(self.name, key_node.start_mark)}: duplicate key {key!r} "
                    f"(first at line {first}); each key may appear once"
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _expanded_size(root: Node, name: str) -> int:
    """How many values the node graph holds once every alias is expanded (ConfigError past the
    budget or on a recursive alias). Iterative, memoized per node: linear in the file's nodes."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, SequenceNode):
            children: list[Node] = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            sizes[key] = 1
            continue
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_EXPANDED_NODES:
                raise ConfigError(
                    f"{_where(name, node.start_mark)}: aliases expand to more than {MAX_EXPANDED_NODES} "
                    "values; write the values out instead of repeating anchors"
                )
            continue
        if key in open_nodes:
            raise ConfigError(f"{_where(name, node.start_mark)}: an alias refers to a value that contains it")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _one_line(err: yaml.YAMLError, name: str) -> str:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        context = f" ({err.context})" if err.context and err.problem else ""
        return f"{_where(name, mark)}: {problem}{context}"
    return f"{name}: not valid YAML: {str(err).splitlines()[0] if str(err) else type(err).__name__}"


def loads(text: str, name: str) -> Any:
    """Parse one YAML document strictly (see the module docstring); None for an empty document."""
    loader = _StrictLoader(text, name)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, name)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(_one_line(err, name)) from err
    finally:
        loader.dispose()


def read(path: str, raw: bytes) -> Any:
    """A scenario file's bytes, size- and encoding-checked, parsed by :func:`loads`."""
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: {len(raw)} bytes is over {MAX_FILE_BYTES}; a scenario is a few KB of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}:{column}: byte 0x{raw[err.start]:02x} is not UTF-8; save the file as UTF-8"
        ) from err
    return loads(text, path)
