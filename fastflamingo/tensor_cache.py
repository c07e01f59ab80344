"""A one-entry cache keyed by tensor identity: what the layers of one forward share.

The layers of a model forward all receive the same tensors (MPT's mask and ALiBi table, the
cross-attention's ``text_time``) and would each derive the same thing from them (an attention
bias, a chunk plan). :class:`SharedByTensors` keeps the last derived value while its key and the
very tensors it was derived from are the ones asked about, and drops it when one of those tensors
is freed (the forward is over), never a newer value's. Tensors are held weakly: the cache keeps
nothing alive. A tensor changed in place is the same object: put its ``_version`` in the key.
"""
from __future__ import annotations

import weakref
from typing import Callable


class SharedByTensors:
    """One (key, tensors) -> value entry; ``None`` stands for an absent tensor."""

    def __init__(self):
        self._entry = None  # (key, weak references, value), replaced whole: no torn reads

    def get(self, key, tensors: tuple, build: Callable[[], object]):
        """The value for ``key`` and exactly these ``tensors``, built by ``build()`` on a miss."""
        entry = self._entry
        if entry is not None and entry[0] == key and len(entry[1]) == len(tensors) and all(
                (t is None) if r is None else (r() is t) for r, t in zip(entry[1], tensors)):
            return entry[2]
        value = build()
        refs = tuple(None if t is None else weakref.ref(t, self._forget) for t in tensors)
        self._entry = (key, refs, value)
        return value

    def _forget(self, ref: weakref.ref) -> None:
        """A tensor of the entry is gone: drop the entry (not a newer one)."""
        entry = self._entry
        if entry is not None and any(r is ref for r in entry[1]):
            self._entry = None

    @property
    def value(self):
        """The value held, or None."""
        return None if self._entry is None else self._entry[2]

    def holds(self, tensor) -> bool:
        """Whether the entry was derived from ``tensor``."""
        return self._entry is not None and any(r is not None and r() is tensor for r in self._entry[1])
