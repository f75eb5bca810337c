from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poise.balancing.consistent import (
    ALGORITHMS,
    MAGLEV_SIZE,
    KetamaRing,
    LoadView,
    Maglev,
    Rendezvous,
)
from poise.balancing.load import Load
from poise.models import Backend

Algorithm = type[KetamaRing] | type[Maglev] | type[Rendezvous]
Picker = KetamaRing | Maglev | Rendezvous
ALGOS: list[Algorithm] = [KetamaRing, Maglev, Rendezvous]
MINIMAL = [KetamaRing, Rendezvous]  # no key ever moves between surviving backends
KEYS = [f"key-{i}".encode() for i in range(2000)]
# Maglev builds a 65537-slot table per picker: a few tens of ms, so fewer examples
FEW = settings(max_examples=8, deadline=None)
SOME = settings(max_examples=25, deadline=None)


def backend(i: int, weight: int = 1) -> Backend:
    return Backend(
        id=f"10.0.0.{i}:80",
        scheme="http",
        host=f"10.0.0.{i}",
        port=80,
        weight=weight,
        index=i,
        authority=f"10.0.0.{i}:80",
    )


def backends(n: int, weights: Sequence[int] = ()) -> list[Backend]:
    return [backend(i, weights[i] if i < len(weights) else 1) for i in range(n)]


def reindexed(bs: Sequence[Backend]) -> list[Backend]:
    """The same backends with ``index`` = position, as a rebuilt group would have them."""
    return [dataclasses.replace(b, index=k) for k, b in enumerate(bs)]


def first(picker: Picker, key: bytes | None) -> Backend:
    return next(iter(picker.candidates(key)))


def firsts(picker: Picker) -> list[str]:
    return [first(picker, k).id for k in KEYS]


class FakeLoad:
    def __init__(self, n: int) -> None:
        self.active = [0] * n


algos = pytest.mark.parametrize("cls", ALGOS, ids=lambda c: c.__name__)


@algos
@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(0, 40),
    weights=st.lists(st.integers(1, 5), max_size=40),
    keys=st.lists(st.one_of(st.none(), st.binary(max_size=40)), min_size=1, max_size=20),
)
def test_candidates_yield_every_backend_exactly_once(
    cls: Algorithm, n: int, weights: list[int], keys: list[bytes | None]
) -> None:
    bs = backends(n, weights)
    picker = cls(bs, random.Random(0))
    for key in keys:
        order = list(picker.candidates(key))
        assert len(order) == n
        assert {b.id for b in order} == {b.id for b in bs}


_BOUNDED: dict[tuple[Algorithm, int, float], tuple[Picker, Picker, FakeLoad]] = {}


def bounded_pair(cls: Algorithm, n: int, factor: float) -> tuple[Picker, Picker, FakeLoad]:
    """A plain and a bounded picker over the same backends, built once (Maglev is not free)."""
    if (cls, n, factor) not in _BOUNDED:
        load = FakeLoad(n)
        bs = backends(n)
        _BOUNDED[cls, n, factor] = (
            cls(bs, random.Random(0)),
            cls(bs, random.Random(0), load, factor),
            load,
        )
    return _BOUNDED[cls, n, factor]


@algos
@SOME
@given(
    n=st.integers(1, 30),
    factor=st.sampled_from([1.01, 1.25, 1.5, 2.0, 3.0]),
    active=st.lists(st.integers(0, 20), min_size=30, max_size=30),
    key=st.binary(max_size=16),
)
def test_bounded_load_moves_overloaded_backends_to_the_end_in_order(
    cls: Algorithm, n: int, factor: float, active: list[int], key: bytes
) -> None:
    plain, bounded, load = bounded_pair(cls, n, factor)
    load.active[:] = active[:n]
    bound = math.ceil(factor * (sum(load.active) + 1) / n)
    order = list(plain.candidates(key))
    under = [b for b in order if load.active[b.index] + 1 <= bound]
    over = [b for b in order if load.active[b.index] + 1 > bound]
    assert under  # factor > 1: someone is always below the bound
    assert list(bounded.candidates(key)) == under + over


@algos
@FEW
@given(n=st.integers(1, 30), seed_a=st.integers(0, 2**32), seed_b=st.integers(0, 2**32))
def test_same_key_same_backend_across_rebuilds_seeds_and_order(
    cls: Algorithm, n: int, seed_a: int, seed_b: int
) -> None:
    bs = backends(n)
    shuffled = bs[:]
    random.Random(seed_b).shuffle(shuffled)
    a = cls(bs, random.Random(seed_a))
    b = cls(shuffled, random.Random(seed_b))
    keys = KEYS[:300]
    assert [first(a, k) for k in keys] == [first(b, k) for k in keys]
    assert [list(a.candidates(k)) for k in keys[:20]] == [list(a.candidates(k)) for k in keys[:20]]


@algos
@FEW
@given(n=st.integers(3, 30), data=st.data())
def test_removing_a_backend_moves_about_one_nth_of_the_keys(
    cls: Algorithm, n: int, data: st.DataObject
) -> None:
    bs = backends(n)
    gone = data.draw(st.integers(0, n - 1), label="removed")
    rest = reindexed(bs[:gone] + bs[gone + 1 :])
    before = firsts(cls(bs, random.Random(1)))
    after = firsts(cls(rest, random.Random(2)))
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert len(moved) / len(KEYS) <= 1.2 / n + 0.03
    if cls in MINIMAL:
        assert all(x == bs[gone].id for x, _ in moved)
    assert bs[gone].id not in after


@algos
@FEW
@given(n=st.integers(3, 30))
def test_adding_a_backend_moves_about_one_nth_of_the_keys(cls: Algorithm, n: int) -> None:
    bs = backends(n + 1)
    before = firsts(cls(bs[:n], random.Random(1)))
    after = firsts(cls(bs, random.Random(2)))
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert len(moved) / len(KEYS) <= 1.2 / n + 0.03
    if cls in MINIMAL:
        assert all(y == bs[n].id for _, y in moved)
    assert Counter(after)[bs[n].id] > 0  # the newcomer gets a share


@algos
@pytest.mark.parametrize(("n", "heavy"), [(2, 0), (4, 1), (6, 5), (10, 3)])
def test_weight_three_gets_about_three_times_the_keys(cls: Algorithm, n: int, heavy: int) -> None:
    weights = [3 if i == heavy else 1 for i in range(n)]
    picker = cls(backends(n, weights), random.Random(0))
    keys = [f"weighted-{i}".encode() for i in range(20_000)]
    counts = Counter(first(picker, k).index for k in keys)
    light = [counts[i] for i in range(n) if i != heavy]
    ratio = counts[heavy] / (sum(light) / len(light))
    assert 3 * 0.75 <= ratio <= 3 * 1.25


@algos
@pytest.mark.parametrize("hot", [1, 7, 10_000], ids=["one-key", "seven-keys", "spread"])
def test_bounded_load_keeps_every_backend_under_the_bound(cls: Algorithm, hot: int) -> None:
    n, factor = 12, 1.25
    load = FakeLoad(n)
    picker = cls(backends(n), random.Random(0), load, factor)
    rng = random.Random(hot)
    for total in range(1, 10_001):
        b = first(picker, f"hot-{rng.randrange(hot)}".encode())
        load.active[b.index] += 1
        assert max(load.active) <= math.ceil(factor * total / n)


@algos
def test_without_a_bound_one_key_stays_on_one_backend(cls: Algorithm) -> None:
    load = FakeLoad(5)
    for picker in (cls(backends(5), random.Random(0), load), cls(backends(5), random.Random(0))):
        for _ in range(100):
            load.active[first(picker, b"hot").index] += 1
    assert sorted(load.active) == [0, 0, 0, 0, 200]


@algos
def test_no_key_spreads_by_the_rng(cls: Algorithm) -> None:
    bs = backends(8)
    picks = [first(cls(bs, random.Random(7)), None).id for _ in range(3)]
    assert len(set(picks)) == 1  # same seed, same draw
    picker = cls(bs, random.Random(7))
    counts = Counter(first(picker, None).id for _ in range(800))
    assert len(counts) == 8
    assert max(counts.values()) < 200


@algos
def test_no_backends(cls: Algorithm) -> None:
    picker = cls([], random.Random(0), FakeLoad(0), 1.25)
    assert list(picker.candidates(b"k")) == []
    assert list(picker.candidates(None)) == []


@algos
def test_real_load_and_repr(cls: Algorithm) -> None:
    load: LoadView = Load(3)
    picker = cls(backends(3), random.Random(0), load, 1.5)
    assert len(list(picker.candidates(b"k"))) == 3
    assert repr(picker).startswith(cls.__name__ + "(3 backends")


def test_algorithms_by_name() -> None:
    assert {"ring": KetamaRing, "maglev": Maglev, "rendezvous": Rendezvous} == ALGORITHMS


def test_maglev_table_is_full_and_shares_are_even() -> None:
    picker = Maglev(backends(7), random.Random(0))
    table = picker._table
    assert len(table) == MAGLEV_SIZE
    counts = Counter(b.id for b in table)
    assert max(counts.values()) - min(counts.values()) <= 1  # Maglev: within one entry


def test_ring_points_follow_weight() -> None:
    picker = KetamaRing(backends(3, [1, 2, 3]), random.Random(0))
    assert Counter(b.index for b in picker._owners) == {0: 160, 1: 320, 2: 480}
