"""Policies that need no key: smooth weighted round robin, random, weighted random, first.

Each returns candidates in preference order; the caller filters unhealthy and tried ones.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Container, Iterable, Iterator, Sequence

from poise.balancing.base import Policy, first_usable, ring_from
from poise.models import Backend


class SmoothWeightedRoundRobin(Policy):
    """nginx's smooth weighted round robin: every pick adds each backend's weight to its
    ``current``, takes the largest, and subtracts the total from it. Weights 5,1,1 give
    ``a a b a c a a`` — never a burst of five ``a`` in a row — and over any window of
    sum(weights) picks each backend gets its weight's share, give or take one. Weights can be
    changed at run time (``set_weight``) without resetting the others' positions."""

    __slots__ = ("_backends", "_current", "_total", "_weights")

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._weights = [b.weight for b in self._backends]
        self._current = [0] * len(self._backends)
        self._total = sum(self._weights)

    def set_weight(self, index: int, weight: int) -> None:
        self._total += weight - self._weights[index]
        self._weights[index] = weight

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        b = self._backends
        if not b:
            return ()
        best = self._step()
        # the chosen one, then (only if asked for) the others by how close they are to it
        return itertools.chain((b[best],), _ByCurrent(b, list(self._current), best))

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        b = self._backends
        if not b:
            return None
        best = self._step()
        x = b[best]
        if up[x.index] and x not in tried:
            return x
        return first_usable(_ByCurrent(b, list(self._current), best), up, tried)

    def _step(self) -> int:
        """One round of nginx's algorithm: the position chosen."""
        current, weights = self._current, self._weights
        best = 0
        for i in range(len(current)):
            current[i] += weights[i]
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return best

    def __repr__(self) -> str:
        return f"SmoothWeightedRoundRobin(weights={self._weights})"


class _ByCurrent:
    __slots__ = ("_b", "_best", "_current")

    def __init__(self, b: tuple[Backend, ...], current: list[int], best: int) -> None:
        self._b, self._current, self._best = b, current, best

    def __iter__(self) -> Iterator[Backend]:
        cur = self._current
        rest = sorted((i for i in range(len(self._b)) if i != self._best), key=lambda i: -cur[i])
        return iter([self._b[i] for i in rest])


class RandomPick(Policy):
    """Uniform random first choice; then the ring order from it."""

    __slots__ = ("_backends", "_rng", "_twice")

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._twice = self._backends * 2
        self._rng = rng

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        b = self._backends
        if not b:
            return ()
        return ring_from(self._twice, self._rng.randrange(len(b)))

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        b = self._backends
        if not b:
            return None
        start = self._rng.randrange(len(b))
        x = b[start]
        if up[x.index] and x not in tried:
            return x
        return first_usable(ring_from(self._twice, start), up, tried)

    def __repr__(self) -> str:
        return f"RandomPick({len(self._backends)} backends)"


class WeightedRandom(Policy):
    """First choice with probability weight/total (a bisect on cumulative weights)."""

    __slots__ = ("_backends", "_cumulative", "_rng", "_total", "_twice")

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._twice = self._backends * 2
        self._cumulative = list(itertools.accumulate(b.weight for b in self._backends))
        self._total = self._cumulative[-1] if self._cumulative else 0
        self._rng = rng

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        if not self._backends:
            return ()
        return ring_from(self._twice, self._start())

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        if not self._backends:
            return None
        start = self._start()
        x = self._backends[start]
        if up[x.index] and x not in tried:
            return x
        return first_usable(ring_from(self._twice, start), up, tried)

    def _start(self) -> int:
        start = bisect.bisect_right(self._cumulative, self._rng.random() * self._total)
        return min(start, len(self._backends) - 1)

    def __repr__(self) -> str:
        return f"WeightedRandom({len(self._backends)} backends)"


class First(Policy):
    """Ordered failover: always the first usable backend in configuration order."""

    __slots__ = ("_backends",)

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._backends = tuple(backends)

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        return self._backends

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        for b in self._backends:  # first_usable, inlined: this is the whole policy
            if up[b.index] and b not in tried:
                return b
        return None

    def __repr__(self) -> str:
        return f"First({len(self._backends)} backends)"
