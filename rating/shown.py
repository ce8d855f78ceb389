"""User values as error messages show them: shortened, whatever their size or depth.

A message must stay readable and small whatever the file held: a `version:` nested 1 000
lists deep made repr() raise RecursionError, and a YAML alias bomb (nine lists of nine
aliases, nine deep: a few hundred bytes of YAML) made a 522 MB message.
"""

from __future__ import annotations

import reprlib

_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel = 2
_REPR.maxstring = 40
_REPR.maxother = 40
_REPR.maxlong = 40
_REPR.maxdict = 4
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 4
_MAX_CHARS = 120


def shown(value: object) -> str:
    """repr(value), shortened: 2 levels deep, 4 items per container, 40 characters per string
    (`'abc...xyz'`) or integer, 120 characters in all."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 (a repr that fails still leaves a message to give)
        return f"<a {type(value).__name__}>"
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 3] + "..."
