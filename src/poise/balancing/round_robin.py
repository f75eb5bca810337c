"""Round robin: each call starts one position further along the ring.

The start offset is random so that several poise workers (or a restart) do not all hit
backend 0 first. For up to ``PRECOMPUTED`` backends every rotation is built once, so a pick
is an index and a counter step; beyond that a lazy chain of two slices is returned. (A
generator would be simpler, but abandoning one after the first candidate — the usual case —
costs a GeneratorExit round trip per request.)
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from itertools import chain, islice

from poise.models import Backend

PRECOMPUTED = 64


class RoundRobin:
    __slots__ = ("_backends", "_n", "_next", "_rotations")

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._n = n = len(self._backends)
        self._next = rng.randrange(n) if n else 0
        b = self._backends
        self._rotations = tuple(b[i:] + b[:i] for i in range(n)) if n <= PRECOMPUTED else ()

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        n = self._n
        if n == 0:
            return ()
        start = self._next
        self._next = start + 1 if start + 1 < n else 0
        if self._rotations:
            return self._rotations[start]
        b = self._backends
        return chain(islice(b, start, None), islice(b, start))

    def __repr__(self) -> str:
        return f"RoundRobin({self._n} backends, next={self._next})"
