"""Argument checks shared by the public functions: one test of what counts as an integer."""
from __future__ import annotations

import operator


def is_int(x) -> bool:
    """An int or a numpy int; not a bool (True would count as 1), nor a float (which would be
    truncated)."""
    if isinstance(x, bool):
        return False
    try:
        operator.index(x)
        return True
    except TypeError:
        return False


def check_count(name: str, value, least: int, *, optional: bool = False, note: str | None = None) -> None:
    """Refuse a count that is not an integer >= ``least`` (None too where ``optional``), naming it:
    a float or a string would otherwise fail deep in torch, and True would count as 1. ``note``
    replaces the message's " or None" after the bound (e.g. " (0: none)")."""
    if optional and value is None:
        return
    if not is_int(value) or value < least:
        note = (" or None" if optional else "") if note is None else note
        raise ValueError(f"{name} must be an int >= {least}{note}, got {value!r}")
