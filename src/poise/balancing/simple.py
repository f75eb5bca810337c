"""Policies that need no key: smooth weighted round robin, random, weighted random, first.

Each returns candidates in preference order; the caller filters unhealthy and tried ones,
and a backend it passes over takes no part in the pick (see :mod:`poise.balancing.base`).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Container, Iterable, Iterator, Sequence

from poise.balancing.base import Policy, first_usable
from poise.models import Backend


class RoundPolicy(Policy):
    """What smooth WRR and least_conn share: a pick is one round among the backends up
    (``_round``: the position chosen and the weight taking part); once that one is passed
    over, the pick goes on as a walk from that round (``_walk``, a ``RoundWalk``)."""

    __slots__ = ("_backends", "_current", "_idx", "_total", "_weights")

    def __init__(self, backends: Sequence[Backend]) -> None:
        self._backends = tuple(backends)
        self._idx = tuple(b.index for b in self._backends)
        self._weights = [b.weight for b in self._backends]
        self._current = [0] * len(self._backends)  # the smooth WRR state
        self._total = sum(self._weights)

    def _round(self, up: Sequence[bool] | None) -> tuple[int, int]:
        raise NotImplementedError

    def _step(self) -> int:
        """One round of nginx's algorithm among all: the position chosen."""
        current, weights = self._current, self._weights
        best = 0
        for i in range(len(current)):
            current[i] += weights[i]
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return best

    def _walk(self, up: Sequence[bool] | None) -> RoundWalk:
        raise NotImplementedError

    def candidates(
        self, key: bytes | None = None, up: Sequence[bool] | None = None
    ) -> Iterable[Backend]:
        if not self._backends:
            return ()
        return self._walk(up)

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        chosen, total = self._round(up)
        if chosen < 0:
            return None
        x = self._backends[chosen]
        if x not in tried:
            return x
        walk = self._walk(up)
        walk.resume(chosen, total)
        return first_usable(walk, up, tried)


class SmoothWeightedRoundRobin(RoundPolicy):
    """nginx's smooth weighted round robin: every pick adds each backend's weight to its
    ``current``, takes the largest, and subtracts the total from it. Weights 5,1,1 give
    ``a a b a c a a`` — never a burst of five ``a`` in a row — and over any window of
    sum(weights) picks each backend gets its weight's share, give or take one. Weights can be
    changed at run time (``set_weight``) without resetting the others' positions.

    As in nginx, only usable backends take part: those not up are left out of the round, and
    one handed out and passed over (tried, at a limit) has its part in the round undone and
    the round run again without it. So with some out, the others share in proportion to
    their weights, as exactly as with all in, rather than one of them taking a missing
    backend's turns."""

    __slots__ = ()

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        super().__init__(backends)

    def set_weight(self, index: int, weight: int) -> None:
        self._total += weight - self._weights[index]
        self._weights[index] = weight

    def _walk(self, up: Sequence[bool] | None) -> RoundWalk:
        return _SwrrWalk(self, up)

    def _round(self, up: Sequence[bool] | None) -> tuple[int, int]:
        """A round among those up: (the position chosen or -1 if none is up, the weight
        taking part)."""
        if not self._backends:
            return -1, 0
        if up is None or False not in up:  # all up, the usual case: no test per backend
            return self._step(), self._total
        current, weights, idx = self._current, self._weights, self._idx
        best, total = -1, 0
        for i in range(len(current)):
            if up[idx[i]]:
                w = weights[i]
                c = current[i] + w
                current[i] = c
                total += w
                if best < 0 or c > current[best]:
                    best = i
        if best >= 0:
            current[best] -= total
        return best, total

    def __repr__(self) -> str:
        return f"SmoothWeightedRoundRobin(weights={self._weights})"


class RoundWalk:
    """What the smooth WRR and least_conn candidate walks share: the first backend is the
    policy's usual round (``round_``, which ``pick`` runs too); once it is passed over, the
    walk goes on without the backends handed out (``_exclusions``), and those not up come
    last, outside any round (``_down``)."""

    __slots__ = ("_backends", "_down", "_excluded", "_idx", "_last", "_p", "_started",
                 "_total", "_up")  # fmt: skip

    def __init__(self, p: RoundPolicy, up: Sequence[bool] | None) -> None:
        self._p = p
        self._backends, self._idx, self._up = p._backends, p._idx, up
        self._started = False  # the first round run
        self._last = -1  # the position handed out last (-1: none, or outside any round)
        self._total = 0  # the weight taking part in the round (least_conn: of the tie)
        self._excluded: list[bool] | None = None  # out: not up, or handed out (once needed)
        self._down: list[int] = []  # those not up, not handed out yet (last first)

    def resume(self, last: int, total: int) -> None:
        """Go on from a round already run, ``last`` handed out."""
        self._started = True
        self._last, self._total = last, total

    def __iter__(self) -> Iterator[Backend]:
        return self

    def __next__(self) -> Backend:
        raise NotImplementedError  # each walk goes on its own way after the first

    def _first(self) -> Backend | None:
        """The usual round's choice, the first time; None afterwards (or if it found none)."""
        if self._started:
            return None
        self._started = True
        last, total = self._p._round(self._up)
        self._last, self._total = last, total
        return self._backends[last] if last >= 0 else None

    def _exclusions(self) -> list[bool]:
        """Which positions are out of the round (built only when the first is passed over)."""
        excluded = self._excluded
        if excluded is None:
            up = self._up
            excluded = self._excluded = [False if up is None else not up[i] for i in self._idx]
            self._down = [k for k in range(len(excluded) - 1, -1, -1) if excluded[k]]
        return excluded


class _SwrrWalk(RoundWalk):
    """A round among those up (all, without ``up``), then, for each backend passed over, the
    round again without it: its weight taken back from its ``current`` and from the round's
    total, the largest of the rest chosen. Those not up come last, outside any round."""

    __slots__ = ()

    def __next__(self) -> Backend:
        first = self._first()
        if first is not None:
            return first
        p = self._p
        excluded = self._exclusions()
        current, weights = p._current, p._weights
        last, total = self._last, self._total
        if last >= 0:  # passed over: its part in the round undone
            w = weights[last]
            current[last] += total - w
            total -= w
            excluded[last] = True
        best = -1
        for i in range(len(current)):
            if not excluded[i] and (best < 0 or current[i] > current[best]):
                best = i
        self._last, self._total = best, total
        if best >= 0:
            current[best] -= total
            return p._backends[best]
        down = self._down
        if down:  # the round is over: those not up, for a caller that wants them anyway
            return p._backends[down.pop()]
        raise StopIteration


class RandomPick(Policy):
    """Uniform random first choice; each backend passed over, a new uniform draw among those
    not handed out yet (a lazy Fisher-Yates shuffle), so with k usable each gets 1/k of the
    picks in expectation."""

    __slots__ = ("_backends", "_rng")

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._rng = rng

    def candidates(
        self, key: bytes | None = None, up: Sequence[bool] | None = None
    ) -> Iterable[Backend]:
        if not self._backends:
            return ()
        return _Shuffle(self._backends, self._rng, -1)

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
        return first_usable(_Shuffle(b, self._rng, start), up, tried)

    def __repr__(self) -> str:
        return f"RandomPick({len(self._backends)} backends)"


class _Shuffle:
    """The backends in a uniformly random order, drawn one at a time (Fisher-Yates, the
    swaps kept in a dict, made at the second draw: nothing is built for the usual one)."""

    __slots__ = ("_b", "_first", "_k", "_rng", "_swaps")

    def __init__(self, b: tuple[Backend, ...], rng: random.Random, first: int) -> None:
        self._b, self._rng = b, rng
        self._first = first  # the first drawn (-1: not yet)
        self._swaps: dict[int, int] | None = None
        self._k = 1 if first >= 0 else 0  # how many were drawn

    def __iter__(self) -> Iterator[Backend]:
        return self

    def __next__(self) -> Backend:
        k, n = self._k, len(self._b)
        if k >= n:
            raise StopIteration
        self._k = k + 1
        if k == 0:
            self._first = first = self._rng.randrange(n)
            return self._b[first]
        swaps = self._swaps
        if swaps is None:  # position 0 now holds the first drawn, its place position 0's
            swaps = self._swaps = {self._first: 0}
        j = k + self._rng.randrange(n - k)
        got = swaps.get(j, j)
        swaps[j] = swaps.get(k, k)
        return self._b[got]


class WeightedRandom(Policy):
    """First choice with probability weight/total (a bisect on cumulative weights); each
    backend passed over, a new draw in proportion to weight among those not handed out yet,
    so with some out each usable backend gets weight / (usable weight) of the picks in
    expectation."""

    __slots__ = ("_backends", "_cumulative", "_rng", "_total")

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._backends = tuple(backends)
        self._cumulative = list(itertools.accumulate(b.weight for b in self._backends))
        self._total = self._cumulative[-1] if self._cumulative else 0
        self._rng = rng

    def candidates(
        self, key: bytes | None = None, up: Sequence[bool] | None = None
    ) -> Iterable[Backend]:
        if not self._backends:
            return ()
        return _WeightedDraws(self, -1)

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        if not self._backends:
            return None
        start = self._start()
        x = self._backends[start]
        if up[x.index] and x not in tried:
            return x
        return first_usable(_WeightedDraws(self, start), up, tried)

    def _start(self) -> int:
        start = bisect.bisect_right(self._cumulative, self._rng.random() * self._total)
        return min(start, len(self._backends) - 1)

    def __repr__(self) -> str:
        return f"WeightedRandom({len(self._backends)} backends)"


class _WeightedDraws:
    """Weighted draws without replacement: the first by bisect, the others (rarely needed)
    by a scan over the weights of those not drawn yet."""

    __slots__ = ("_first", "_left", "_p", "_taken")

    def __init__(self, p: WeightedRandom, first: int) -> None:
        self._p = p
        self._first = first  # the first drawn (-1: not yet)
        self._taken: list[bool] | None = None  # built at the second draw
        self._left = 0  # the weight not drawn yet, once past the first

    def __iter__(self) -> Iterator[Backend]:
        return self

    def __next__(self) -> Backend:
        p = self._p
        b = p._backends
        taken = self._taken
        if taken is None:
            first = self._first
            if first < 0:
                self._first = first = p._start()
                return b[first]
            taken = self._taken = [False] * len(b)
            taken[first] = True
            self._left = p._total - b[first].weight
        last = -1
        r = p._rng.random() * self._left
        for i in range(len(b)):
            if not taken[i]:
                last = i
                r -= b[i].weight
                if r < 0:
                    break
        if last < 0:
            raise StopIteration
        taken[last] = True
        self._left -= b[last].weight
        return b[last]


class First(Policy):
    """Ordered failover: always the first usable backend in configuration order."""

    __slots__ = ("_backends",)

    def __init__(self, backends: Sequence[Backend], rng: random.Random) -> None:
        self._backends = tuple(backends)

    def candidates(
        self, key: bytes | None = None, up: Sequence[bool] | None = None
    ) -> Iterable[Backend]:
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
