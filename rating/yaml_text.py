"""YAML text to plain data with the safe loader, on libyaml's C parser when PyYAML has it.

Loading a 10 000-account file took 5.9 s with the pure-Python parser and 1.9 s with this one
(each a `python -c` run, interpreter start-up included), and `metering rate`, `accounts
import` and every worker start load that file.
"""

from __future__ import annotations

import io
from typing import Any

import yaml

YAMLError = yaml.YAMLError
_BASE: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Levels of nesting refused (a catalog has 6). libyaml's composer recurses on the C stack:
# ~30 000 levels (a 60 KB line of "[") killed the process with SIGSEGV, not an error.
MAX_DEPTH = 100


class _Loader(_BASE):  # type: ignore[valid-type,misc]
    """The safe loader, refusing a key given twice in one mapping (YAML would keep the last
    one silently, and a doubled `per_minute` or `balance` is a typo that must not pass) and a
    key that is not plain text (`? [x]`: a list or mapping cannot be a name). Merge keys
    (`<<: *base`) work as YAML defines them: keys written in the mapping override merged ones.
    A value Python cannot hold (`2026-13-01` read as a date, an integer of 5 000 digits) is a
    YAML error at its position, not a ValueError from deep inside the loader."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._checked_nodes: set[int] = set()
        self._depth = 0

    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        # Called by the composer (C or Python) on entering every node, ascend_resolver on leaving it.
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(
                "while composing a node", getattr(current_node, "start_mark", None),
                f"found more than {MAX_DEPTH} levels of nesting", None)
        super().descend_resolver(current_node, current_index)

    def ascend_resolver(self) -> None:
        self._depth -= 1
        super().ascend_resolver()

    def _check_keys(self, node: yaml.MappingNode) -> None:
        """Refuse complex and repeated keys among those *written* in this mapping. Runs once per
        node, before flatten_mapping splices merged keys into node.value (they may repeat a
        written key: that is what a merge is for)."""
        if id(node) in self._checked_nodes:
            return
        self._checked_nodes.add(id(node))
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    "found a complex key (a list or mapping); keys must be plain text", key_node.start_mark)
            key = ("<<", _MERGE_TAG) if key_node.tag == _MERGE_TAG else self.construct_object(key_node)
            if key in seen:
                shown = "<<" if key_node.tag == _MERGE_TAG else repr(key)
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {shown} twice (the second one here)", key_node.start_mark)
            seen.add(key)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Called on every mapping before it is built, and on each mapping merged into another.
        if isinstance(node, yaml.MappingNode):
            self._check_keys(node)
        super().flatten_mapping(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {exc}", node.start_mark) from None


def parse_yaml(text: str, name: str | None = None) -> Any:
    """Plain data (dicts, lists, scalars) for YAML text; raises YAMLError on bad syntax, a key
    repeated in one mapping or a key that is not plain text. `name` (the file) is what error
    messages say instead of "<unicode string>"."""
    stream: Any = text
    if name is not None:
        stream = io.StringIO(text)
        stream.name = name  # both parsers name the input after the stream's `name`
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 (a safe loader, C or Python)
