"""Modulo hashing on a request key: ``crc32(key) % n`` picks the first backend (the seed's
``?key=`` behaviour). The fallbacks, for a first backend that is down or tried, are the
others in a key-derived order (highest random weight on the key and each backend's id), so
the keys of a missing backend spread evenly over the others rather than all going to its
neighbour, and each key keeps its fallback while that lasts. A request without the key uses
``default_key`` when configured, else the fallback policy. The same key maps to the same
backend for as long as membership does not change (use consistent hashing when it does)."""

from __future__ import annotations

import random
import zlib
from collections.abc import Container, Iterable, Iterator, Sequence
from itertools import chain

from poise.balancing.base import Picker, Policy
from poise.balancing.consistent import hash64, mix64
from poise.balancing.round_robin import RoundRobin
from poise.models import Backend


class HashPick(Policy):
    __slots__ = ("_backends", "_default", "_fallback", "_ids")

    def __init__(
        self,
        backends: Sequence[Backend],
        rng: random.Random,
        default_key: bytes | None = None,
        fallback: Picker | None = None,
    ) -> None:
        self._backends = tuple(backends)
        self._ids = [hash64(b.id.encode(), b"hash-fallback") for b in self._backends]
        self._default = default_key
        self._fallback: Picker = fallback if fallback is not None else RoundRobin(backends, rng)

    def candidates(
        self, key: bytes | None = None, up: Sequence[bool] | None = None
    ) -> Iterable[Backend]:
        if key is None:
            key = self._default
            if key is None:
                return self._fallback.candidates(None, up)
        b = self._backends
        if not b:
            return ()
        start = zlib.crc32(key) % len(b)
        return chain((b[start],), _Others(self, key, start))

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        if key is None:
            key = self._default
            if key is None:
                return self._fallback.pick(None, up, tried)
        b = self._backends
        if not b:
            return None
        start = zlib.crc32(key) % len(b)
        x = b[start]
        if up[x.index] and x not in tried:
            return x
        scores = self._scores(key)  # the first usable of _Others: the best usable score
        best, top = None, -1
        for i in range(len(b)):
            x = b[i]
            if i != start and scores[i] > top and up[x.index] and x not in tried:
                best, top = x, scores[i]
        return best

    def _scores(self, key: bytes) -> list[int]:
        """Each backend's fallback score for ``key``: the higher, the more preferred."""
        kh = hash64(key, b"hash-fallback")
        return [mix64(kh ^ ih) for ih in self._ids]

    def __repr__(self) -> str:
        return f"HashPick({len(self._backends)} backends)"


class _Others:
    """The backends but the first, by descending score (computed only if asked for)."""

    __slots__ = ("_key", "_p", "_start")

    def __init__(self, p: HashPick, key: bytes, start: int) -> None:
        self._p, self._key, self._start = p, key, start

    def __iter__(self) -> Iterator[Backend]:
        scores = self._p._scores(self._key)
        start = self._start
        order = sorted((i for i in range(len(scores)) if i != start), key=scores.__getitem__,
                       reverse=True)  # fmt: skip
        b = self._p._backends
        return iter([b[i] for i in order])
