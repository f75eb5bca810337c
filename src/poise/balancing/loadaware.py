"""Policies that read load: least connections, power of two choices, peak EWMA.

They read a :class:`~poise.balancing.load.Load` the proxy keeps up to date; the clock comes
from ``now`` (a callable returning the proxy's coarse clock), so the policies stay pure.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

from poise.balancing.load import Load
from poise.models import Backend


class LeastConn:
    """Fewest requests in flight relative to weight (active / weight); ties go round robin,
    so idle backends share the work instead of the first one taking it all."""

    __slots__ = ("_backends", "_load", "_next")

    def __init__(self, backends: Sequence[Backend], rng: random.Random, load: Load) -> None:
        self._backends = tuple(backends)
        self._load = load
        self._next = rng.randrange(len(self._backends)) if self._backends else 0

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        b = self._backends
        n = len(b)
        if n == 0:
            return ()
        start = self._next
        self._next = (start + 1) % n
        active = self._load.active
        order = sorted(range(n), key=lambda i: (active[i] / b[i].weight, (i - start) % n))
        return [b[i] for i in order]

    def __repr__(self) -> str:
        return f"LeastConn({self._load.active})"


class PowerOfTwo:
    """Power of two choices, least request: sample two distinct backends at random and
    prefer the one with the better score ``weight / (active + 1) ** bias`` (with equal
    weights: fewer in flight). Never picks the worse of its two; the rest follow as
    fallbacks in ring order."""

    __slots__ = ("_backends", "_bias", "_load", "_rng")

    def __init__(
        self, backends: Sequence[Backend], rng: random.Random, load: Load, bias: float = 1.0
    ) -> None:
        self._backends = tuple(backends)
        self._rng = rng
        self._load = load
        self._bias = bias

    def score(self, i: int) -> float:
        return float(self._backends[i].weight / (self._load.active[i] + 1) ** self._bias)

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        b = self._backends
        n = len(b)
        if n < 2:
            return b
        i, j = self._rng.sample(range(n), 2)
        if self.score(j) > self.score(i):
            i, j = j, i
        rest = [b[k] for k in range(n) if k not in (i, j)]
        return [b[i], b[j], *rest]

    def __repr__(self) -> str:
        return f"PowerOfTwo({self._load.active})"


class PeakEwma:
    """Power of two choices over peak-EWMA latency x (in flight + 1): latency-aware, and a
    backend slowed down gets clearly less traffic while still being probed."""

    __slots__ = ("_backends", "_load", "_now", "_rng")

    def __init__(
        self,
        backends: Sequence[Backend],
        rng: random.Random,
        load: Load,
        now: Callable[[], float],
    ) -> None:
        self._backends = tuple(backends)
        self._rng = rng
        self._load = load
        self._now = now

    def cost(self, i: int, now: float) -> float:
        load = self._load
        # an unmeasured backend costs like a fast one, so it gets measured
        return (load.cost_latency(i, now) + 1e-4) * (load.active[i] + 1) / self._backends[i].weight

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        b = self._backends
        n = len(b)
        if n < 2:
            return b
        i, j = self._rng.sample(range(n), 2)
        now = self._now()
        if self.cost(j, now) < self.cost(i, now):
            i, j = j, i
        rest = [b[k] for k in range(n) if k not in (i, j)]
        return [b[i], b[j], *rest]

    def __repr__(self) -> str:
        return f"PeakEwma({self._load.active})"
