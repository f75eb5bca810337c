"""Policies that read load: least connections, power of two choices, peak EWMA.

They read a :class:`~poise.balancing.load.Load` the proxy keeps up to date; the clock comes
from ``now`` (a callable returning the proxy's coarse clock), so the policies stay pure.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from itertools import chain

from poise.balancing.base import Policy, first_usable
from poise.balancing.load import Load
from poise.models import Backend


class LeastConn(Policy):
    """Fewest requests in flight relative to weight (active / weight); ties go round robin,
    so idle backends share the work instead of the first one taking it all."""

    __slots__ = ("_backends", "_load", "_next")

    def __init__(self, backends: Sequence[Backend], rng: random.Random, load: Load) -> None:
        self._backends = tuple(backends)
        self._load = load
        self._next = rng.randrange(len(self._backends)) if self._backends else 0

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        b = self._backends
        if not b:
            return ()
        start, best = self._choose()
        return chain((b[best],), _ByLoad(b, self._load.active, best, start))

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        b = self._backends
        if not b:
            return None
        start, best = self._choose()
        x = b[best]
        if up[x.index] and x not in tried:
            return x
        return first_usable(_ByLoad(b, self._load.active, best, start), up, tried)

    def _choose(self) -> tuple[int, int]:
        """(this call's ring start, the least loaded backend's position); moves the start."""
        b = self._backends
        n = len(b)
        start = self._next
        self._next = (start + 1) % n
        active = self._load.active
        best, best_cost = start, active[start] / b[start].weight
        for k in range(start + 1, start + n):  # ring order from start: ties go round robin
            i = k if k < n else k - n
            cost = active[i] / b[i].weight
            if cost < best_cost:
                best, best_cost = i, cost
        return start, best

    def __repr__(self) -> str:
        return f"LeastConn({self._load.active})"


class PowerOfTwo(Policy):
    """Power of two choices, least request: sample two distinct backends at random and
    prefer the one with the better score ``weight / (active + 1) ** bias`` (with equal
    weights: fewer in flight). Never picks the worse of its two; the rest follow as
    fallbacks in ring order."""

    __slots__ = ("_backends", "_bias", "_bits", "_equal", "_load", "_rng", "_weights")

    def __init__(
        self, backends: Sequence[Backend], rng: random.Random, load: Load, bias: float = 1.0
    ) -> None:
        self._backends = tuple(backends)
        self._rng = rng
        self._bits = rng.getrandbits
        self._load = load
        self._bias = bias
        self._weights = tuple(b.weight for b in self._backends)
        # equal weights (and a positive bias, as config requires): the better is simply the
        # one with fewer in flight
        self._equal = len(set(self._weights)) <= 1 and bias > 0

    def score(self, i: int) -> float:
        return float(self._backends[i].weight / (self._load.active[i] + 1) ** self._bias)

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        b = self._backends
        if len(b) < 2:
            return b
        i, j = self._two()
        return chain((b[i], b[j]), _Others(b, i, j))

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        b = self._backends
        if len(b) < 2:
            return first_usable(b, up, tried)
        i, j = self._two()
        return _better_of_two(b, i, j, up, tried)

    def _two(self) -> tuple[int, int]:
        """The two sampled positions, the better first."""
        i, j = _two(self._bits, len(self._backends))
        active = self._load.active
        if self._equal:
            if active[j] < active[i]:
                i, j = j, i
        elif self._bias == 1.0:
            w = self._weights  # weight/(active+1), compared without dividing
            if w[j] * (active[i] + 1) > w[i] * (active[j] + 1):
                i, j = j, i
        elif self.score(j) > self.score(i):
            i, j = j, i
        return i, j

    def __repr__(self) -> str:
        return f"PowerOfTwo({self._load.active})"


class PeakEwma(Policy):
    """Power of two choices over peak-EWMA latency x (in flight + 1): latency-aware, and a
    backend slowed down gets clearly less traffic while still being probed."""

    __slots__ = ("_backends", "_bits", "_load", "_now", "_rng")

    def __init__(
        self,
        backends: Sequence[Backend],
        rng: random.Random,
        load: Load,
        now: Callable[[], float],
    ) -> None:
        self._backends = tuple(backends)
        self._rng = rng
        self._bits = rng.getrandbits
        self._load = load
        self._now = now

    def cost(self, i: int, now: float) -> float:
        load = self._load
        # an unmeasured backend costs like a fast one, so it gets measured
        return (load.cost_latency(i, now) + 1e-4) * (load.active[i] + 1) / self._backends[i].weight

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        b = self._backends
        if len(b) < 2:
            return b
        i, j = self._two()
        return chain((b[i], b[j]), _Others(b, i, j))

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        b = self._backends
        if len(b) < 2:
            return first_usable(b, up, tried)
        i, j = self._two()
        return _better_of_two(b, i, j, up, tried)

    def _two(self) -> tuple[int, int]:
        """The two sampled positions, the cheaper first."""
        i, j = _two(self._bits, len(self._backends))
        now = self._now()
        if self.cost(j, now) < self.cost(i, now):
            i, j = j, i
        return i, j

    def __repr__(self) -> str:
        return f"PeakEwma({self._load.active})"


def _better_of_two(
    b: tuple[Backend, ...], i: int, j: int, up: Sequence[bool], tried: Container[Backend]
) -> Backend | None:
    """``pick`` for a sampled pair, the better (i) first: i if usable, else the first usable
    of j and then the rest."""
    x = b[i]
    if up[x.index] and x not in tried:
        return x
    return first_usable(chain((b[j],), _Others(b, i, j)), up, tried)


def _two(bits: Callable[[int], int], n: int) -> tuple[int, int]:
    """Two distinct indexes in range(n), uniformly (cheaper than Random.sample; ``bits`` is
    ``Random.getrandbits``: scaling 32 random bits is cheaper than ``int(random() * n)``,
    and off uniform by under n / 2**32)."""
    i = bits(32) * n >> 32
    j = bits(32) * (n - 1) >> 32
    return i, (j + 1 if j >= i else j)


class _Others:
    """The backends other than the two sampled, computed only if the caller gets that far
    (it usually stops at the first)."""

    __slots__ = ("_b", "_i", "_j")

    def __init__(self, b: tuple[Backend, ...], i: int, j: int) -> None:
        self._b, self._i, self._j = b, i, j

    def __iter__(self) -> Iterator[Backend]:
        return iter([x for k, x in enumerate(self._b) if k not in (self._i, self._j)])


class _ByLoad:
    """Least-conn fallbacks in order of load (ties in ring order), computed lazily."""

    __slots__ = ("_active", "_b", "_best", "_start")

    def __init__(self, b: tuple[Backend, ...], active: list[int], best: int, start: int) -> None:
        self._b, self._active, self._best, self._start = b, active, best, start

    def __iter__(self) -> Iterator[Backend]:
        b, active, n, start = self._b, self._active, len(self._b), self._start
        order = sorted(
            (i for i in range(n) if i != self._best),
            key=lambda i: (active[i] / b[i].weight, (i - start) % n),
        )
        return iter([b[i] for i in order])
