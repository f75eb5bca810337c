"""Modulo hashing on a request key: ``crc32(key) % n`` picks the first backend (the seed's
``?key=`` behaviour), the ring order from there gives the fallbacks. A request without the
key uses ``default_key`` when configured, else the fallback policy. The same key maps to
the same backend for as long as membership does not change (use consistent hashing when
it does)."""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Iterable, Sequence

from poise.balancing.base import Picker
from poise.balancing.round_robin import RoundRobin
from poise.models import Backend


class HashPick:
    __slots__ = ("_backends", "_default", "_fallback")

    def __init__(
        self,
        backends: Sequence[Backend],
        rng: random.Random,
        default_key: bytes | None = None,
        fallback: Picker | None = None,
    ) -> None:
        self._backends = tuple(backends)
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
        start = zlib.crc32(key) % len(b)
        return itertools.chain(itertools.islice(b, start, None), itertools.islice(b, start))

    def __repr__(self) -> str:
        return f"HashPick({len(self._backends)} backends)"
