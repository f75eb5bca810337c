"""Round robin: each call starts one position further along the ring.

The start offset is random so that several poise workers (or a restart) do not all hit
backend 0 first.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from poise.models import Backend


class RoundRobin:
    __slots__ = ("_backends", "_n", "_next")

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._n = len(self._backends)
        self._next = rng.randrange(self._n) if self._n else 0

    def candidates(self, key: bytes | None = None) -> Iterator[Backend]:
        n = self._n
        if n == 0:
            return
        start = self._next
        self._next = start + 1 if start + 1 < n else 0
        backends = self._backends
        for i in range(start, n):
            yield backends[i]
        for i in range(start):
            yield backends[i]

    def __repr__(self) -> str:
        return f"RoundRobin({self._n} backends, next={self._next})"
