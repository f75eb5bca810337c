"""Round robin: each pick takes the next usable backend after the last one taken.

The cursor moves past the backend actually taken, not one position per call: with b2 of
b1, b2, b3 out, picks go b1, b3, b1, b3 ... (each usable backend gets 1/k of the picks,
give or take one, k being the number usable) rather than b3 also taking b2's turn. The
start offset is random so that several poise workers (or a restart) do not all hit
backend 0 first. ``candidates`` walks the ring from the cursor, moving the cursor past each
backend it hands out (a caller stops at the one it takes: see :mod:`poise.balancing.base`);
``pick`` looks at the cursor's backend alone unless it is unusable.
"""

from __future__ import annotations

import random
from collections.abc import Container, Iterable, Iterator, Sequence

from poise.balancing.base import Policy
from poise.models import Backend


class RoundRobin(Policy):
    __slots__ = ("_backends", "_n", "_next")

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._n = n = len(self._backends)
        self._next = rng.randrange(n) if n else 0

    def candidates(
        self, key: bytes | None = None, up: Sequence[bool] | None = None
    ) -> Iterable[Backend]:
        if self._n == 0:
            return ()
        return _Walk(self)

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        n = self._n
        if n == 0:
            return None
        bs = self._backends
        start = self._next
        b = bs[start]
        if up[b.index] and b not in tried:
            self._next = start + 1 if start + 1 < n else 0
            return b
        for k in range(start + 1, start + n):  # first_usable(candidates()), inlined
            i = k if k < n else k - n
            b = bs[i]
            if up[b.index] and b not in tried:
                self._next = i + 1 if i + 1 < n else 0
                return b
        return None  # (a walk over them all leaves the cursor where it was)

    def __repr__(self) -> str:
        return f"RoundRobin({self._n} backends, next={self._next})"


class _Walk:
    """The ring from the cursor, moving the cursor past each backend handed out. (A class,
    not a generator: abandoning a generator after the first backend, the usual case, costs
    a GeneratorExit round trip.)"""

    __slots__ = ("_k", "_rr", "_start")

    def __init__(self, rr: RoundRobin) -> None:
        self._rr = rr
        self._start = rr._next
        self._k = 0

    def __iter__(self) -> Iterator[Backend]:
        return self

    def __next__(self) -> Backend:
        rr = self._rr
        n = rr._n
        k = self._k
        if k >= n:
            raise StopIteration
        self._k = k + 1
        i = self._start + k
        if i >= n:
            i -= n
        rr._next = i + 1 if i + 1 < n else 0
        return rr._backends[i]
