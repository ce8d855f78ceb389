"""YAML text to plain data with the safe loader, on libyaml's C parser when PyYAML has it.

Loading a 10 000-account file took 5.9 s with the pure-Python parser and 1.9 s with this one
(each a `python -c` run, interpreter start-up included), and `metering rate`, `accounts
import` and every worker start load that file.
"""

from __future__ import annotations

from typing import Any

import yaml

YAMLError = yaml.YAMLError
_BASE: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BASE):  # type: ignore[valid-type,misc]
    """The safe loader, refusing a key given twice in one mapping: YAML would keep the last
    one silently, and a doubled `per_minute` or `balance` is a typo that must not pass."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key!r} twice (the second one here)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


def parse_yaml(text: str) -> Any:
    """Plain data (dicts, lists, scalars) for YAML text; raises YAMLError on bad syntax or a
    key repeated in one mapping."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a safe loader, C or Python)
