"""Policies that read load: least connections, power of two choices, peak EWMA.

They read a :class:`~poise.balancing.load.Load` the proxy keeps up to date; the clock comes
from ``now`` (a callable returning the proxy's coarse clock), so the policies stay pure.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from typing import cast

from poise.balancing.base import Policy, first_usable
from poise.balancing.load import Load
from poise.balancing.simple import RoundPolicy, RoundWalk
from poise.models import Backend


class LeastConn(RoundPolicy):
    """Fewest requests in flight relative to weight (active / weight) among those up; ties
    (all idle, the usual case under light load) are broken by smooth weighted round robin
    among the tied backends, as nginx does, so weights 5,1,1 share sequential requests
    5:1:1 and equal backends take turns. A backend passed over (tried, at a limit) takes no
    part: the pick is made again among the others (see :mod:`poise.balancing.base`)."""

    __slots__ = ("_load",)

    def __init__(self, backends: Sequence[Backend], rng: random.Random, load: Load) -> None:
        super().__init__(backends)
        self._load = load

    def _walk(self, up: Sequence[bool] | None) -> RoundWalk:
        return _LeastWalk(self, up)

    def _round(self, up: Sequence[bool] | None) -> tuple[int, int]:
        """The least loaded of those up, chosen by a smooth WRR round among those tied with
        it: (its position or -1 if none is up, the tie's weight)."""
        if not self._weights:
            return -1, 0
        if up is not None and False in up:
            return self._round_among(up)
        if max(self._load.active) == 0:  # all up and idle: all tied, a round among all
            return self._step(), self._total
        return self._round_busy()

    def _round_busy(self) -> tuple[int, int]:
        """``_round`` with all up, the usual case: no test per backend."""
        active, w = self._load.active, self._weights
        # the least active/weight (compared multiplied out: no division), the first of equals
        best, ba, bw = 0, active[0], w[0]
        for i in range(1, len(w)):
            a = active[i]
            if a * bw < ba * w[i]:
                best, ba, bw = i, a, w[i]
        return self._tie_round(best, ba, bw, None)

    def _round_among(self, up: Sequence[bool]) -> tuple[int, int]:
        """``_round`` with some backends not up."""
        active, w, idx = self._load.active, self._weights, self._idx
        best, ba, bw = -1, 0, 1
        for i in range(len(w)):
            if up[idx[i]]:
                a = active[i]
                if best < 0 or a * bw < ba * w[i]:
                    best, ba, bw = i, a, w[i]
        if best < 0:
            return -1, 0
        return self._tie_round(best, ba, bw, up)

    def _tie_round(self, best: int, ba: int, bw: int, up: Sequence[bool] | None) -> tuple[int, int]:
        """A smooth WRR round among those (up) tied with ``best`` (``ba`` in flight over
        weight ``bw``), all after it: (the position chosen, the tie's weight)."""
        active, w, current, idx = self._load.active, self._weights, self._current, self._idx
        chosen, total = best, 0
        for i in range(best, len(w)):
            wi = w[i]
            if active[i] * bw == ba * wi and (up is None or up[idx[i]]):
                c = current[i] + wi
                current[i] = c
                total += wi
                if c > current[chosen]:
                    chosen = i
        current[chosen] -= total
        return chosen, total

    def __repr__(self) -> str:
        return f"LeastConn({self._load.active})"


class _LeastWalk(RoundWalk):
    """Least-conn picks among those up (all, without ``up``), each made without the
    backends handed out before it. Within a tie, one passed over has its part in the smooth
    WRR round undone and the round goes to the largest ``current`` of the rest of the tie;
    past the tie, a new round among the next least loaded. Those not up come last."""

    __slots__ = ()

    def __next__(self) -> Backend:
        first = self._first()
        if first is not None:
            return first
        p = cast(LeastConn, self._p)
        excluded = self._exclusions()
        active, weights, current = p._load.active, p._weights, p._current
        n = len(excluded)
        last = self._last
        total = 0
        ba, bw = 0, 1
        if last >= 0:  # passed over: take its part back
            excluded[last] = True
            wl = weights[last]
            current[last] += self._total - wl
            total = self._total - wl
            ba, bw = active[last], wl  # the tie's cost
        if total <= 0:  # a new round: the least loaded of those left
            best = -1
            for i in range(n):
                if not excluded[i] and (best < 0 or active[i] * bw < ba * weights[i]):
                    best, ba, bw = i, active[i], weights[i]
            if best < 0:
                self._last = -1
                if self._down:  # those not up, for a caller that wants them anyway
                    return p._backends[self._down.pop()]
                raise StopIteration
            for i in range(best, n):
                if not excluded[i] and active[i] * bw == ba * weights[i]:
                    current[i] += weights[i]
                    total += weights[i]
        chosen = -1
        for i in range(n):  # the largest current of the tie (its members already added)
            if (
                not excluded[i]
                and active[i] * bw == ba * weights[i]
                and (chosen < 0 or current[i] > current[chosen])
            ):
                chosen = i
        current[chosen] -= total
        self._last, self._total = chosen, total
        return p._backends[chosen]


class TwoChoices(Policy):
    """What power of two choices and peak EWMA share: sample two distinct backends at random
    and take the better (``better``); if both are passed over, new pairs are drawn from the
    rest (``_Pairs``), so no backend is favoured for its position."""

    __slots__ = ("_backends", "_bits", "_load")

    def __init__(self, backends: Sequence[Backend], rng: random.Random, load: Load) -> None:
        self._backends = tuple(backends)
        self._bits = rng.getrandbits
        self._load = load

    def better(self, i: int, j: int) -> tuple[int, int]:
        """``i`` and ``j``, the better first."""
        raise NotImplementedError

    def candidates(
        self, key: bytes | None = None, up: Sequence[bool] | None = None
    ) -> Iterable[Backend]:
        b = self._backends
        if len(b) < 2:
            return b
        i, j = self._two()
        return _Pairs(self, i, j)

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        b = self._backends
        if len(b) < 2:
            return first_usable(b, up, tried)
        i, j = self._two()
        x = b[i]
        if up[x.index] and x not in tried:
            return x
        return first_usable(_Pairs(self, i, j, 1), up, tried)

    def _two(self) -> tuple[int, int]:
        """The two sampled positions, the better first."""
        i, j = _two(self._bits, len(self._backends))
        return self.better(i, j)


class PowerOfTwo(TwoChoices):
    """Power of two choices, least request: sample two distinct backends at random and
    prefer the one with the better score ``weight / (active + 1) ** bias`` (with equal
    weights: fewer in flight). Never picks the worse of its two; if both are passed over,
    new pairs are drawn from the rest, so no backend is favoured for its position."""

    __slots__ = ("_bias", "_equal", "_weights")

    def __init__(
        self, backends: Sequence[Backend], rng: random.Random, load: Load, bias: float = 1.0
    ) -> None:
        super().__init__(backends, rng, load)
        self._bias = bias
        self._weights = tuple(b.weight for b in self._backends)
        # equal weights (and a positive bias, as config requires): the better is simply the
        # one with fewer in flight
        self._equal = len(set(self._weights)) <= 1 and bias > 0

    def score(self, i: int) -> float:
        return float(self._backends[i].weight / (self._load.active[i] + 1) ** self._bias)

    def better(self, i: int, j: int) -> tuple[int, int]:
        """``i`` and ``j``, the better first."""
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


class PeakEwma(TwoChoices):
    """Power of two choices over peak-EWMA latency x (in flight + 1): latency-aware, and a
    backend slowed down gets clearly less traffic while still being probed."""

    __slots__ = ("_now",)

    def __init__(
        self,
        backends: Sequence[Backend],
        rng: random.Random,
        load: Load,
        now: Callable[[], float],
    ) -> None:
        super().__init__(backends, rng, load)
        self._now = now

    def cost(self, i: int, now: float) -> float:
        load = self._load
        # an unmeasured backend costs like a fast one, so it gets measured
        return (load.cost_latency(i, now) + 1e-4) * (load.active[i] + 1) / self._backends[i].weight

    def better(self, i: int, j: int) -> tuple[int, int]:
        """``i`` and ``j``, the cheaper first."""
        now = self._now()
        if self.cost(j, now) < self.cost(i, now):
            i, j = j, i
        return i, j

    def __repr__(self) -> str:
        return f"PeakEwma({self._load.active})"


def _two(bits: Callable[[int], int], n: int) -> tuple[int, int]:
    """Two distinct indexes in range(n), uniformly (cheaper than Random.sample; ``bits`` is
    ``Random.getrandbits``: scaling 32 random bits is cheaper than ``int(random() * n)``,
    and off uniform by under n / 2**32)."""
    i = bits(32) * n >> 32
    j = bits(32) * (n - 1) >> 32
    return i, (j + 1 if j >= i else j)


class _Pairs:
    """The sampled pair, the better first, then (rarely needed: both passed over) pairs drawn
    from those not handed out yet, each the better first: every backend is handed out once,
    and none is favoured for its position."""

    __slots__ = ("_given", "_i", "_j", "_p", "_rest")

    def __init__(self, p: TwoChoices, i: int, j: int, given: int = 0) -> None:
        self._p, self._i, self._j = p, i, j
        self._given = given  # how many of the pair were handed out
        self._rest: list[int] | None = None

    def __iter__(self) -> Iterator[Backend]:
        return self

    def __next__(self) -> Backend:
        b = self._p._backends
        given = self._given
        if given < 2:
            self._given = given + 1
            return b[self._i if given == 0 else self._j]
        rest = self._rest
        if rest is None:
            i, j = self._i, self._j
            rest = self._rest = [k for k in range(len(b)) if k not in (i, j)]
        if len(rest) < 2:
            if not rest:
                raise StopIteration
            return b[rest.pop()]
        i, j = _two(self._p._bits, len(rest))
        x, y = self._p.better(rest[i], rest[j])
        for k in (max(i, j), min(i, j)):  # out of rest (the higher first: indexes hold)
            rest[k] = rest[-1]
            rest.pop()
        self._i, self._j, self._given = x, y, 1
        return b[x]
