"""Warnings about what the caller gave fastflamingo: :class:`InputWarning`, at the caller's line."""
from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


class InputWarning(UserWarning):
    """fastflamingo's warnings about its input: a ``UserWarning`` (filters and
    ``pytest.warns(UserWarning)`` take it as one) that the command line prints as its own."""


def warn_caller(message: str) -> None:
    """Warn with :class:`InputWarning`, pointing at the first frame outside fastflamingo and torch
    (the user's line, not the check's)."""
    f, level = sys._getframe(0), 1
    while f is not None and (f.f_code.co_filename.startswith(_PACKAGE) or f"{os.sep}torch{os.sep}" in f.f_code.co_filename):
        f, level = f.f_back, level + 1
    warnings.warn(message, InputWarning, stacklevel=level)
