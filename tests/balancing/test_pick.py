"""``Picker.pick`` is the proxy's shortcut for "the first usable of ``candidates``": it must
answer exactly as filtering ``candidates(key)`` does and leave the picker in the same state
(round-robin position, random draws, smooth-WRR currents), call after call."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poise.balancing import build, new_load
from poise.balancing.base import first_usable
from poise.config.model import PolicyConfig
from poise.models import Backend
from poise.testing import FakeClock

POLICIES = [
    PolicyConfig("round_robin"),
    PolicyConfig("weighted_round_robin"),
    PolicyConfig("random"),
    PolicyConfig("weighted_random"),
    PolicyConfig("least_conn"),
    PolicyConfig("p2c"),
    PolicyConfig("p2c", bias=2.0),
    PolicyConfig("peak_ewma"),
    PolicyConfig("first"),
    PolicyConfig("hash", key="header:x-user"),
    PolicyConfig("hash", key="header:x-user", default_key="dflt"),
    PolicyConfig("hash", key="header:x-user", fallback="p2c"),
    PolicyConfig("consistent_hash", key="header:x-user", algorithm="ring"),
    PolicyConfig("consistent_hash", key="header:x-user", algorithm="maglev"),
    PolicyConfig("consistent_hash", key="header:x-user", algorithm="rendezvous"),
    PolicyConfig("consistent_hash", key="header:x-user", balance_factor=1.25),
    PolicyConfig("consistent_hash", key="header:x-user", algorithm="maglev", default_key="d"),
    PolicyConfig("sticky", key="cookie:s", secret="s" * 16),
]


def backends(weights: list[int], order: list[int]) -> list[Backend]:
    """Backends whose ``index`` is not their position: pickers must go by ``index``."""
    return [
        Backend(id=f"b{i}", scheme="http", host="127.0.0.1", port=1000 + i, weight=weights[i],
                index=i, authority=f"127.0.0.1:{1000 + i}")
        for i in order
    ]  # fmt: skip


def label(p: PolicyConfig) -> str:
    default = PolicyConfig()
    changed = [f"{f.name}={getattr(p, f.name)}" for f in dataclasses.fields(p)
               if f.name not in ("name", "key", "secret")
               and getattr(p, f.name) != getattr(default, f.name)]  # fmt: skip
    return "-".join([p.name, *changed])


call = st.tuples(
    st.sampled_from([None, b"user-1", b"user-2", b"user-3", b"dflt", "pin0", "pin1"]),
    st.lists(st.booleans(), min_size=12, max_size=12),  # up, by index
    st.lists(st.integers(0, 11), max_size=3),  # tried, by index
    st.lists(st.integers(0, 3), min_size=12, max_size=12),  # in flight, by index
)


@pytest.mark.parametrize("policy", POLICIES, ids=label)
@settings(max_examples=15, deadline=None)
@given(
    weights=st.lists(st.integers(1, 4), min_size=12, max_size=12),
    n=st.integers(0, 12),
    seed=st.integers(0, 999),
    calls=st.lists(call, min_size=1, max_size=12),
)
def test_pick_is_the_first_usable_candidate_with_the_same_effect(
    policy: PolicyConfig,
    weights: list[int],
    n: int,
    seed: int,
    calls: list[tuple[bytes | str | None, list[bool], list[int], list[int]]],
) -> None:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    bs = backends(weights, order)
    by_index = {b.index: b for b in bs}
    clock = FakeClock(100.0)
    # two pickers built alike, each with its own (identical) load and random source
    loads = [new_load(policy, n), new_load(policy, n)]
    a = build(policy, bs, random.Random(seed), loads[0], clock)
    b = build(policy, bs, random.Random(seed), loads[1], clock)
    for key, up, tried_idx, active in calls:
        if isinstance(key, str):  # a sticky cookie pinning to a backend, when there is one
            values = getattr(a, "values", ())
            k = int(key[-1])
            key = values[k] if k < len(values) else b"no-such-pin"  # noqa: PLW2901
        for load in loads:
            if load is not None:
                load.active[:] = active[:n]
        tried = tuple(by_index[i] for i in tried_idx if i in by_index)
        expected = first_usable(a.candidates(key, up), up, tried)
        assert b.pick(key, up, tried) == expected
        clock.advance(0.01)
        for load in loads:
            if load is not None and expected is not None:
                load.finished(expected.index, 0.002 * (expected.index + 1), True, clock())


@pytest.mark.parametrize("policy", POLICIES, ids=label)
def test_pick_with_nothing_usable_is_none(policy: PolicyConfig) -> None:
    bs = backends([1] * 5, list(range(5)))
    p = build(policy, bs, random.Random(0))
    assert p.pick(b"user-1", (False,) * 5, ()) is None
    assert p.pick(b"user-1", (True,) * 5, tuple(bs)) is None
    assert p.pick(None, (True,) * 5, tuple(bs[1:])) == bs[0]


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
def test_round_robin_beyond_precomputed_rotations_keeps_ring_order(n: int) -> None:
    bs = backends([1] * n, list(range(n)))
    p = build(PolicyConfig("round_robin"), bs, random.Random(n))
    for _ in range(3):
        got = [x.index for x in p.candidates()]
        assert got == [(got[0] + k) % n for k in range(n)]
