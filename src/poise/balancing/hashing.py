"""Modulo hashing on a request key: ``crc32(key) % n`` picks the first backend (the seed's
``?key=`` behaviour), the ring order from there gives the fallbacks. A request without the
key uses ``default_key`` when configured, else the fallback policy. The same key maps to
the same backend for as long as membership does not change (use consistent hashing when
it does)."""

from __future__ import annotations

import random
import zlib
from collections.abc import Container, Iterable, Sequence

from poise.balancing.base import Picker, Policy, first_usable, ring_from
from poise.balancing.round_robin import RoundRobin
from poise.models import Backend


class HashPick(Policy):
    __slots__ = ("_backends", "_default", "_fallback", "_twice")

    def __init__(
        self,
        backends: Sequence[Backend],
        rng: random.Random,
        default_key: bytes | None = None,
        fallback: Picker | None = None,
    ) -> None:
        self._backends = tuple(backends)
        self._twice = self._backends * 2
        self._default = default_key
        self._fallback: Picker = fallback if fallback is not None else RoundRobin(backends, rng)

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        if key is None:
            key = self._default
            if key is None:
                return self._fallback.candidates(None)
        b = self._backends
        if not b:
            return ()
        return ring_from(self._twice, zlib.crc32(key) % len(b))

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
        return first_usable(ring_from(self._twice, start), up, tried)

    def __repr__(self) -> str:
        return f"HashPick({len(self._backends)} backends)"
