"""Round robin: each call starts one position further along the ring.

The start offset is random so that several poise workers (or a restart) do not all hit
backend 0 first. For up to ``PRECOMPUTED`` backends every rotation is built once, so
``candidates`` is an index and a counter step; beyond that it is a lazy walk over the
backends laid out twice, which costs the same at any start. (A generator would be simpler,
but abandoning one after the first candidate — the usual case — costs a GeneratorExit
round trip per request.) ``pick`` looks at the start backend alone unless it is unusable.
"""

from __future__ import annotations

import random
from collections.abc import Container, Iterable, Sequence

from poise.balancing.base import Policy, first_usable, ring_from
from poise.models import Backend

PRECOMPUTED = 64


class RoundRobin(Policy):
    __slots__ = ("_backends", "_n", "_next", "_rotations", "_twice")

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._n = n = len(self._backends)
        self._next = rng.randrange(n) if n else 0
        b = self._backends
        self._rotations = tuple(b[i:] + b[:i] for i in range(n)) if n <= PRECOMPUTED else ()
        self._twice = b + b

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        n = self._n
        if n == 0:
            return ()
        start = self._next
        self._next = start + 1 if start + 1 < n else 0
        return self._order(start)

    def _order(self, start: int) -> Iterable[Backend]:
        if self._rotations:
            return self._rotations[start]
        return ring_from(self._twice, start)

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        n = self._n
        if n == 0:
            return None
        start = self._next
        self._next = start + 1 if start + 1 < n else 0
        b = self._backends[start]
        if up[b.index] and b not in tried:
            return b
        return first_usable(self._order(start), up, tried)

    def __repr__(self) -> str:
        return f"RoundRobin({self._n} backends, next={self._next})"
