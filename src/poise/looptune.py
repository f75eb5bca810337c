"""uvloop's record of live transports, kept with plain weak references.

Theory of operation
-------------------
uvloop notes every transport it makes in a ``weakref.WeakValueDictionary`` keyed by file
descriptor (``Loop._transports``). It reads that record in one place: ``add_reader``,
``add_writer`` and their ``remove_`` twins refuse a descriptor that a live transport owns.
A ``WeakValueDictionary`` pays for its tidiness in Python code: each entry is a ``KeyedRef``
made by ``weakref.py``, and each transport's end runs a Python callback that deletes its
entry. On a new connection per request that was about 1.4 µs of about 24 (``bench/run.py
--header 'Connection: close'``, compiled, same run: 24.3 → 22.9 CPU-µs per request).

``lighten(loop)`` gives the loop's record a subclass of ``WeakValueDictionary`` whose
``__setitem__`` stores a plain ``weakref.ref``, with no callback. Reading is unchanged: a
dead transport's entry reads as missing, as a removed one did, so ``add_reader`` still
refuses exactly the descriptors of live transports. Dead entries are not deleted; the next
transport on the same descriptor number replaces them, so the record holds at most one
entry per descriptor number in use at some point (bounded by the process's open files).

The record is a private attribute of uvloop's ``Loop`` with no Python name, found through
``gc.get_referents(loop)``: when exactly one ``WeakValueDictionary`` is there, it is the
one. asyncio's selector loop keeps the same record for the same check (``_transports``) and
is lightened alike. A loop with no such record, or several, is left as it is and ``lighten``
answers False.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

__all__ = ["FdRecord", "lighten"]


class FdRecord(weakref.WeakValueDictionary[Any, Any]):
    """A ``WeakValueDictionary`` whose entries are plain weak references (see above)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        self.data[key] = weakref.ref(value)  # type: ignore[attr-defined]  # not in typeshed


def lighten(loop: asyncio.AbstractEventLoop) -> bool:
    """Give ``loop``'s transport record plain weak references; False if it has none."""
    found = [o for o in gc.get_referents(loop) if type(o) is weakref.WeakValueDictionary]
    if len(found) != 1:
        return False
    found[0].__class__ = FdRecord
    return True
