"""Consistent hashing: a request key keeps mapping to the same backend, and a change of
membership moves only about 1/n of the keys.

Three algorithms, all hashing with BLAKE2b (64-bit digests, stable across processes and
machines, unlike Python's ``hash()``), all honouring backend weights:

``KetamaRing`` (``ring``)
    Each backend puts ``160 * weight`` points on a 64-bit circle at ``hash(f"{id}-{i}")``.
    A key belongs to the first point at or after its own hash (a ``bisect`` on the sorted
    points); the fallbacks are the further distinct backends met walking clockwise. Removing
    a backend hands only its arcs to its neighbours: no other key moves.

``Maglev`` (``maglev``)
    Google's Maglev lookup table of M = 65537 (prime) slots. Each backend has a permutation
    of the slots, ``(offset + j * skip) % M`` with ``offset = h1 % M`` and
    ``skip = h2 % (M - 1) + 1`` from two independent hashes of its id; in turns (backends
    in id order) each takes the next free slot of its permutation, ``weight`` slots per
    turn, until the table is full. A pick is one index, ``table[hash(key) % M]``; the shares
    are near-perfectly even (weighted), at the price of a little extra churn on a membership
    change (a few keys move between surviving backends). Fallbacks: the new backends met
    scanning on from the key's slot, then every backend not met yet, in a key-derived
    rotation.

``Rendezvous`` (``rendezvous``)
    Highest random weight: every backend scores ``-weight / ln(u)``, ``u`` in (0, 1) from a
    64-bit hash of (key, backend id), and the candidates are the backends by descending
    score. Weighted exactly and minimally disruptive (only the keys of a removed backend
    move), but O(n) per pick.

A call without a key (``key=None``) uses ``default_key`` when given, else the ``fallback``
policy when given (``build`` passes both from the config), else hashes a key drawn from
``rng``, so keyless requests spread over the backends like random picks rather than piling
onto one backend.

Bounded load ("consistent hashing with bounded loads", Mirrokni, Thorup and Zadimoghaddam):
given a ``load`` and a ``balance_factor`` c, a backend already holding
``ceil(c * (total_in_flight + 1) / n)`` requests is moved to the end of the candidates
(order otherwise kept, so the caller can still fall back to it). A first candidate is then
never over that bound as long as one under it exists, which is always the case for c > 1.
The bound is per backend and ignores weights; it is taken when ``candidates`` is called.
Without a load or a factor nothing moves.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from collections.abc import Container, Iterable, Iterator, Sequence
from hashlib import blake2b
from itertools import chain
from typing import Protocol

from poise.balancing.base import Picker, Policy, first_usable
from poise.models import Backend

POINTS_PER_WEIGHT = 160  # ketama's virtual nodes per unit of weight
MAGLEV_SIZE = 65537  # prime, well above 100 x the usual number of backends
_MASK64 = (1 << 64) - 1
_TO_UNIT = 2.0**-53


class LoadView(Protocol):
    """What bounded load reads: requests in flight per ``Backend.index``."""

    active: list[int]


KEY_CACHE_SIZE = 4096  # keys whose place and first backend a picker remembers


def hash64(data: bytes, person: bytes = b"") -> int:
    """A stable, well mixed 64-bit hash (BLAKE2b); ``person`` makes independent variants."""
    return int.from_bytes(blake2b(data, digest_size=8, person=person).digest(), "big")


def mix64(x: int) -> int:
    """MurmurHash3's 64-bit finaliser: a bijection with full avalanche."""
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _MASK64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _MASK64
    return x ^ (x >> 33)


class _Consistent(Policy):
    """What the three share: the backends, the missing-key rule, the key hash cache and
    bounded load. An algorithm gives ``_place(h)``, where key hash ``h`` lands (a ring
    point, or ``h`` itself), ``_first(place)``, the backend owning it, and
    ``_rest(place, first)``, the others in preference order, lazily (the caller usually
    stops at the first). A key's place and first backend are remembered: the same keys
    come back (users, sessions), and then a pick is a dict lookup."""

    __slots__ = (
        "_backends", "_cache", "_default", "_factor", "_fallback", "_load", "_n", "_rng",
    )  # fmt: skip

    def __init__(
        self,
        backends: Sequence[Backend],
        rng: random.Random,
        load: LoadView | None = None,
        balance_factor: float | None = None,
        *,
        default_key: bytes | None = None,
        fallback: Picker | None = None,
    ) -> None:
        self._backends = tuple(backends)
        self._n = len(self._backends)
        self._rng = rng
        self._load = load if balance_factor is not None else None
        self._factor = float(balance_factor or 0.0)
        self._cache: dict[bytes, tuple[int, Backend]] = {}
        self._default = default_key
        self._fallback = fallback
        self._build()

    def _build(self) -> None:
        """The variant's own structure over ``_backends`` (its ring or table), at creation."""

    def candidates(
        self, key: bytes | None = None, up: Sequence[bool] | None = None
    ) -> Iterable[Backend]:
        if key is None:
            key = self._default
            if key is None and self._fallback is not None:
                return self._fallback.candidates(None, up)
        if not self._n:
            return ()
        place, first = self._lookup(key)
        return self._order(first, self._rest(place, first))

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        if key is None:
            key = self._default
            if key is None and self._fallback is not None:
                return self._fallback.pick(None, up, tried)
        if not self._n:
            return None
        hit = self._cache.get(key)  # type: ignore[arg-type]  # _lookup's cache, inline
        if hit is None:  # (None is never cached: a keyless call draws a hash in _lookup)
            hit = self._lookup(key)
        place, first = hit
        if up[first.index] and first not in tried:
            load = self._load
            if load is None:
                return first
            active = load.active
            if active[first.index] < self._bound(active):
                return first
        return first_usable(self._order(first, self._rest(place, first)), up, tried)

    def _place(self, h: int) -> int:
        return h

    def _first(self, place: int) -> Backend:
        raise NotImplementedError

    def _rest(self, place: int, first: Backend) -> Iterable[Backend]:
        raise NotImplementedError

    def _lookup(self, key: bytes | None) -> tuple[int, Backend]:
        """The key's place and first backend; a keyless call hashes a random key."""
        if key is None:
            place = self._place(self._rng.getrandbits(64))
            return place, self._first(place)
        cache = self._cache
        hit = cache.get(key)
        if hit is None:
            place = self._place(hash64(key))
            hit = (place, self._first(place))
            if len(cache) >= KEY_CACHE_SIZE:  # bounded: a flood of new keys starts it over
                cache.clear()
            cache[key] = hit
        return hit

    def _bound(self, active: list[int]) -> int:
        return math.ceil(self._factor * (sum(active) + 1) / self._n)

    def _order(self, first: Backend, rest: Iterable[Backend]) -> Iterable[Backend]:
        """``first`` then ``rest``, with bounded load applied when configured."""
        load = self._load
        if load is None:
            return chain((first,), rest)
        active = load.active
        bound = self._bound(active)
        if active[first.index] < bound:  # the usual case: the fallbacks stay lazy
            return chain((first,), _deferring(rest, active, bound))
        return _deferring(chain((first,), rest), active, bound)


def _unseen(order: Iterable[Backend], seen: set[str], n: int) -> Iterator[Backend]:
    """The backends of ``order`` not in ``seen`` (which they join), until all ``n`` are."""
    for b in order:
        if len(seen) >= n:
            return
        if b.id not in seen:
            seen.add(b.id)
            yield b


def _deferring(order: Iterable[Backend], active: list[int], bound: int) -> Iterator[Backend]:
    """``order`` with the backends at or over ``bound`` moved to the end, order kept."""
    deferred = []
    for b in order:
        if active[b.index] < bound:
            yield b
        else:
            deferred.append(b)
    yield from deferred


class KetamaRing(_Consistent):
    __slots__ = ("_hashes", "_owners")

    def _build(self) -> None:
        # a point is (hash << 32 | position in id order): sorting ints is quick, and ties
        # (practically never) go by id, so the ring does not depend on backend order
        by_id = sorted(self._backends, key=lambda b: b.id)
        points = sorted(
            hash64(f"{b.id}-{i}".encode()) << 32 | k
            for k, b in enumerate(by_id)
            for i in range(POINTS_PER_WEIGHT * max(b.weight, 1))
        )
        self._hashes = [p >> 32 for p in points]
        self._owners = [by_id[p & 0xFFFFFFFF] for p in points]

    def _place(self, h: int) -> int:
        """The first point at or after ``h``, round the circle."""
        i = bisect_left(self._hashes, h)
        return i if i < len(self._hashes) else 0

    def _first(self, place: int) -> Backend:
        return self._owners[place]

    def _rest(self, place: int, first: Backend) -> Iterator[Backend]:
        """The other backends, clockwise from point ``place`` (lazily: usually never run)."""
        owners = self._owners
        clockwise = chain(range(place + 1, len(owners)), range(place))
        return _unseen((owners[j] for j in clockwise), {first.id}, self._n)

    def __repr__(self) -> str:
        return f"KetamaRing({self._n} backends, {len(self._hashes)} points)"


class Maglev(_Consistent):
    __slots__ = ("_table",)

    def _build(self) -> None:
        by_id = sorted(self._backends, key=lambda b: b.id)
        slots = _maglev_slots(
            [hash64(b.id.encode(), b"maglev-offset") for b in by_id],
            [hash64(b.id.encode(), b"maglev-skip") for b in by_id],
            [max(b.weight, 1) for b in by_id],
        )
        self._table = [by_id[s] for s in slots]

    def _first(self, place: int) -> Backend:
        return self._table[place % MAGLEV_SIZE]

    def _rest(self, place: int, first: Backend) -> Iterator[Backend]:
        """New backends from the slots after the key's, then the rest in a key-derived
        rotation (a bounded scan: a light backend may own very few slots). ``place`` is the
        key hash."""
        h = place
        slot = h % MAGLEV_SIZE
        table = self._table
        n = self._n
        seen = {first.id}
        end = slot + 1 + min(MAGLEV_SIZE - 1, 8 * n + 64)
        yield from _unseen((table[j % MAGLEV_SIZE] for j in range(slot + 1, end)), seen, n)
        bs = self._backends
        start = (h >> 17) % n
        yield from _unseen((bs[(start + k) % n] for k in range(n)), seen, n)

    def __repr__(self) -> str:
        return f"Maglev({self._n} backends, M={MAGLEV_SIZE})"


def _maglev_slots(h1: list[int], h2: list[int], weights: list[int]) -> list[int]:
    """The Maglev table: slot -> backend position. Each backend's permutation is a full
    cycle of the slots (M prime, 0 < skip < M), so a free slot is always found."""
    if not weights:
        return []
    m = MAGLEV_SIZE
    table = [-1] * m
    pos = [h % m for h in h1]  # where each backend's permutation goes on from
    turns = [(i, h % (m - 1) + 1, w) for i, (h, w) in enumerate(zip(h2, weights, strict=True))]
    left = m
    while True:
        for i, skip, weight in turns:
            c = pos[i]
            w = weight
            while True:
                while table[c] >= 0:  # taken: next slot of this permutation
                    c += skip
                    if c >= m:
                        c -= m
                table[c] = i
                left -= 1
                if not left:
                    return table
                w -= 1
                if not w:
                    break
            pos[i] = c  # (now taken: the next turn steps past it)


class Rendezvous(_Consistent):
    __slots__ = ("_ids", "_weights")

    def _build(self) -> None:
        self._ids = [hash64(b.id.encode(), b"rendezvous") for b in self._backends]
        weights = [float(max(b.weight, 1)) for b in self._backends]
        # equal weights: -w / ln(u) grows with u, so the raw hash orders the same
        self._weights = weights if len(set(weights)) > 1 else None

    def _first(self, place: int) -> Backend:
        # the best score, without sorting them all: max keeps the first of equal scores, as
        # the stable descending sort in _rest does, so the two agree
        scores = self._scores(place)
        return self._backends[max(range(self._n), key=scores.__getitem__)]

    def _rest(self, place: int, first: Backend) -> Iterable[Backend]:
        bs = self._backends
        scores = self._scores(place)
        order = sorted(range(len(bs)), key=scores.__getitem__, reverse=True)
        return [bs[k] for k in order[1:]]  # (order[0] is first)

    def _scores(self, kh: int) -> list[float] | list[int]:
        """Each backend's score for key hash ``kh``: the higher, the more preferred."""
        mixed = [mix64(kh ^ ih) for ih in self._ids]  # a hash of (key, backend id)
        weights = self._weights
        if weights is None:
            scores: list[float] | list[int] = mixed
        else:
            log = math.log
            scores = [
                -w / log(((x >> 11) + 0.5) * _TO_UNIT) for w, x in zip(weights, mixed, strict=True)
            ]
        return scores

    def __repr__(self) -> str:
        return f"Rendezvous({self._n} backends)"


ALGORITHMS: dict[
    str,
    type[KetamaRing] | type[Maglev] | type[Rendezvous],
] = {"ring": KetamaRing, "maglev": Maglev, "rendezvous": Rendezvous}
