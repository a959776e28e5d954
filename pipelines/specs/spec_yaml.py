"""PyYAML's safe loader, made strict for specs: no key twice, no alias bombs.

PyYAML's `SafeLoader` runs no code, but it lets a later key silently replace an earlier one
(`optim:` written twice: the first block is lost) and it expands aliases without limit: a
275-byte spec of nested `&a [*a, *a, ...]` stands for billions of values, which validation and
error messages then walk (1.4 GB of memory). This subclass refuses both while it composes the
document, before any Python value is built. PyYAML has no option for either (its issue #41 and
#165 are open), hence the few lines here. An integer longer than Python converts (4300 digits,
`sys.get_int_max_str_digits`) is refused naming its key, not raised as a bare ValueError.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# A spec is a few hundred values; a sweep's categorical choices a few thousand. Past this many
# values, counted with every alias expanded, a document is refused.
MAX_NODES = 100_000


class SpecYAMLError(yaml.YAMLError):
    """A spec's YAML is well formed but refused; `line` (1-based) is where, when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class SpecLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate mapping keys and documents whose aliases expand past `MAX_NODES`."""

    def construct_document(self, node: Node) -> Any:
        _expanded_size(node)
        self._paths: dict[int, str] = {}  # id(node) -> where it sits (`trainer.max_epochs`, `hidden_sizes[1]`)
        return super().construct_document(node)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        where = self._paths.get(id(node))
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges on purpose; its keys may be overridden
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise SpecYAMLError(f"duplicate key {str(key)[:80]!r} (lines {seen[key]} and {line})", line)
            seen[key] = line
            self._paths.setdefault(id(value_node), f"{where}.{str(key)[:80]}" if where else str(key)[:80])
        return super().construct_mapping(node, deep=deep)

    def construct_sequence(self, node: SequenceNode, deep: bool = False) -> list[Any]:
        where = self._paths.get(id(node), "")
        for index, child in enumerate(node.value):
            self._paths.setdefault(id(child), f"{where}[{index}]")
        return super().construct_sequence(node, deep=deep)

    def construct_yaml_int(self, node: ScalarNode) -> int:
        # Past Python's limit (4300 digits) `int()` raises ValueError; `0x…` and `1:00:…:00` are
        # read without that limit into an int no error message could print: both are refused.
        limit = sys.get_int_max_str_digits()
        try:
            value = super().construct_yaml_int(node)
        except ValueError:
            value = None
        if value is None or value.bit_length() > limit * 10 // 3:
            where = self._paths.get(id(node))
            raise SpecYAMLError(
                f"{where + ': ' if where else ''}a number of {len(str(node.value))} characters; "
                f"a spec's integers have at most {limit} digits",
                node.start_mark.line + 1,
            )
        return value


SpecLoader.add_constructor("tag:yaml.org,2002:int", SpecLoader.construct_yaml_int)


def _expanded_size(root: Node) -> int:
    """How many nodes `root` stands for with every alias expanded; refuses past `MAX_NODES` or a cycle.

    Each distinct node is sized once (aliases share their anchor's node), so this costs the
    document's own size, never the expansion's.
    """
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise SpecYAMLError("an alias refers to a value that contains it (a cycle)", node.start_mark.line + 1)
        in_progress.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        in_progress.discard(key)
        if total > MAX_NODES:
            raise SpecYAMLError(
                f"aliases expand to more than {MAX_NODES} values; a spec is far smaller", node.start_mark.line + 1
            )
        sizes[key] = total
        return total

    return size(root)


def load(text: str) -> Any:
    """One YAML document, read with `SpecLoader`; raises `yaml.YAMLError` (or `SpecYAMLError`)."""
    return yaml.load(text, Loader=SpecLoader)  # noqa: S506 - SpecLoader is a SafeLoader
