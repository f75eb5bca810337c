from __future__ import annotations

import itertools
import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from poise.balancing import build
from poise.balancing.round_robin import RoundRobin
from poise.config.model import PolicyConfig
from poise.models import Backend


def backends(n: int) -> list[Backend]:
    return [
        Backend(id=f"b{i}", scheme="http", host="127.0.0.1", port=1000 + i, index=i)
        for i in range(n)
    ]


@given(n=st.integers(1, 50), rounds=st.integers(1, 20), seed=st.integers(0, 2**32))
def test_exact_fairness_over_whole_rounds(n: int, rounds: int, seed: int) -> None:
    rr = RoundRobin(backends(n), random.Random(seed))
    picks = Counter(next(iter(rr.candidates())).id for _ in range(n * rounds))
    assert set(picks.values()) == {rounds}


@given(n=st.integers(1, 150), seed=st.integers(0, 2**32))
def test_candidates_yield_each_backend_once_in_ring_order(n: int, seed: int) -> None:
    bs = backends(n)
    rr = RoundRobin(bs, random.Random(seed))
    for _ in range(3):
        order = [b.index for b in rr.candidates()]
        assert sorted(order) == list(range(n))
        start = order[0]
        assert order == [(start + k) % n for k in range(n)]


def test_consecutive_calls_start_one_further() -> None:
    rr = RoundRobin(backends(4), random.Random(1))
    starts = [next(iter(rr.candidates())).index for _ in range(8)]
    assert all((b - a) % 4 == 1 for a, b in itertools.pairwise(starts))


def test_no_backends_yields_nothing() -> None:
    assert list(RoundRobin([], random.Random(0)).candidates()) == []


def test_build_by_name() -> None:
    picker = build(PolicyConfig("round_robin"), backends(2), random.Random(0))
    assert isinstance(picker, RoundRobin)
