"""Property tests of the keyless and load-aware policies, hashing, keys and Load."""

from __future__ import annotations

import hashlib
import hmac
import random
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poise.balancing import build
from poise.balancing.hashing import HashPick
from poise.balancing.keys import KeySource, extract
from poise.balancing.load import FAILURE_PENALTY, Load
from poise.balancing.loadaware import LeastConn, PeakEwma, PowerOfTwo
from poise.balancing.simple import First, RandomPick, SmoothWeightedRoundRobin, WeightedRandom
from poise.config.model import PolicyConfig
from poise.models import Backend
from poise.testing import FakeClock


def backends(weights: list[int]) -> list[Backend]:
    return [
        Backend(id=f"b{i}", scheme="http", host="127.0.0.1", port=1000 + i, weight=w, index=i,
                authority=f"127.0.0.1:{1000 + i}")
        for i, w in enumerate(weights)
    ]  # fmt: skip


def first(picker: object, key: bytes | None = None) -> Backend:
    return next(iter(picker.candidates(key)))  # type: ignore[attr-defined]


def test_smooth_wrr_matches_nginx_sequence() -> None:
    p = SmoothWeightedRoundRobin(backends([5, 1, 1]), random.Random(0))
    seq = "".join("abc"[first(p).index] for _ in range(14))
    assert seq == "aabacaa" * 2


@given(st.lists(st.integers(1, 8), min_size=1, max_size=8), st.integers(1, 5))
def test_smooth_wrr_shares_within_one_over_any_window(weights: list[int], rounds: int) -> None:
    p = SmoothWeightedRoundRobin(backends(weights), random.Random(0))
    total = sum(weights)
    picks = [first(p).index for _ in range(total * rounds)]
    for start in range(len(picks) - total + 1):
        window = Counter(picks[start : start + total])
        for i, w in enumerate(weights):
            assert abs(window[i] - w) <= 1


def test_smooth_wrr_weight_change_keeps_fairness() -> None:
    p = SmoothWeightedRoundRobin(backends([1, 1]), random.Random(0))
    for _ in range(5):
        first(p)
    p.set_weight(0, 3)
    counts = Counter(first(p).index for _ in range(400))
    assert counts == {0: 300, 1: 100}


def test_weighted_random_statistically_follows_weights() -> None:
    p = WeightedRandom(backends([1, 2, 7]), random.Random(42))
    n = 20000
    counts = Counter(first(p).index for _ in range(n))
    for i, share in enumerate([0.1, 0.2, 0.7]):
        assert abs(counts[i] / n - share) < 0.02


POLICY_NAMES = ["round_robin", "weighted_round_robin", "random", "weighted_random",
                "least_conn", "p2c", "peak_ewma", "hash", "first"]  # fmt: skip


@pytest.mark.parametrize("name", POLICY_NAMES)
@given(weights=st.lists(st.integers(1, 5), min_size=1, max_size=12), seed=st.integers(0, 999))
@settings(max_examples=30)
def test_candidates_yield_each_backend_exactly_once(
    name: str, weights: list[int], seed: int
) -> None:
    bs = backends(weights)
    p = build(PolicyConfig(name=name), bs, random.Random(seed))
    for key in (None, b"user-1", b"user-2"):
        got = [b.index for b in p.candidates(key)]
        assert sorted(got) == list(range(len(bs)))


def test_random_uses_every_backend() -> None:
    p = RandomPick(backends([1] * 4), random.Random(1))
    assert {first(p).index for _ in range(200)} == {0, 1, 2, 3}


def test_first_is_ordered_failover() -> None:
    p = First(backends([1, 1, 1]), random.Random(0))
    assert [b.index for b in p.candidates()] == [0, 1, 2]


def test_least_conn_prefers_fewest_in_flight_and_breaks_ties_round_robin() -> None:
    load = Load(3)
    p = LeastConn(backends([1, 1, 1]), random.Random(0), load)
    load.active[:] = [2, 0, 1]
    assert first(p).index == 1
    load.active[:] = [0, 0, 0]
    assert {first(p).index for _ in range(3)} == {0, 1, 2}
    load.active[:] = [2, 2, 0]
    weighted = LeastConn(backends([4, 1, 1]), random.Random(0), load)
    load.active[:] = [3, 1, 1]  # 3/4 < 1/1
    assert first(weighted).index == 0


@given(active=st.lists(st.integers(0, 20), min_size=2, max_size=10), seed=st.integers(0, 999))
def test_p2c_never_picks_the_worse_of_its_two(active: list[int], seed: int) -> None:
    load = Load(len(active))
    load.active[:] = active
    p = PowerOfTwo(backends([1] * len(active)), random.Random(seed), load)
    a, b, *_ = p.candidates()
    assert active[a.index] <= active[b.index]


def test_p2c_with_weights_uses_weight_over_active_bias() -> None:
    load = Load(2)
    load.active[:] = [3, 0]
    p = PowerOfTwo(backends([10, 1]), random.Random(0), load, bias=1.0)
    assert first(p).index == 0  # 10/4 > 1/1


def test_load_peak_ewma_takes_peaks_at_once_and_decays() -> None:
    load = Load(1)
    load.started(0)
    load.finished(0, 0.5, True, now=100.0)
    assert load.active == [0]
    assert load.cost_latency(0, 100.0) == pytest.approx(0.5)
    load.finished(0, 0.1, True, now=101.0)  # lower sample: pulled down, not replaced
    assert 0.1 < load.cost_latency(0, 101.0) < 0.5
    assert load.cost_latency(0, 200.0) < 0.01  # left alone, it decays: probed again
    load.finished(0, 0.001, False, now=201.0)  # a fast failure is charged the penalty
    assert load.cost_latency(0, 201.0) == pytest.approx(FAILURE_PENALTY)


def test_peak_ewma_sends_clearly_less_to_a_slow_backend() -> None:
    clock = FakeClock(1000.0)
    load = Load(3)
    p = PeakEwma(backends([1, 1, 1]), random.Random(3), load, clock)
    counts: Counter[int] = Counter()
    for _ in range(3000):
        b = first(p)
        counts[b.index] += 1
        load.started(b.index)
        clock.advance(0.001)
        load.finished(b.index, 0.050 if b.index == 2 else 0.001, True, clock())
    assert counts[2] < counts[0] / 3
    assert counts[2] > 0  # still probed


def test_hash_key_is_stable_across_rebuilds_and_uses_crc32() -> None:
    bs = backends([1] * 5)
    a = HashPick(bs, random.Random(1))
    b = HashPick(bs, random.Random(2))
    for k in (b"alice", b"bob", b"42"):
        assert first(a, k) == first(b, k)
    import zlib

    assert first(a, b"abc").index == zlib.crc32(b"abc") % 5


def test_hash_missing_key_uses_default_key_else_fallback() -> None:
    bs = backends([1] * 4)
    with_default = build(PolicyConfig(name="hash", key="query:key", default_key="x"), bs,
                         random.Random(0))  # fmt: skip
    assert first(with_default, None) == first(with_default, b"x")
    fallback = build(PolicyConfig(name="hash", key="query:key", fallback="round_robin"), bs,
                     random.Random(0))  # fmt: skip
    assert len({first(fallback, None).index for _ in range(4)}) == 4  # round robin


HEADERS = [b"X-User", b": ", b"alice", b"\r\n", b"Cookie", b": ", b"a=1; sid=s3cr3t", b"\r\n"]


@pytest.mark.parametrize(
    ("spec", "target", "expected"),
    [
        ("ip", b"/", b"10.0.0.1"),
        ("uri", b"/p?q=1", b"/p?q=1"),
        ("header:x-user", b"/", b"alice"),
        ("header:X-Missing", b"/", None),
        ("cookie:sid", b"/", b"s3cr3t"),
        ("cookie:nope", b"/", None),
        ("query:key", b"/x?a=1&key=k%20v", b"k v"),
        ("query:key", b"/x?a=1", None),
        ("query:key", b"/x", None),
    ],
)
def test_key_extraction(spec: str, target: bytes, expected: bytes | None) -> None:
    assert extract(KeySource.parse(spec), b"10.0.0.1", target, HEADERS) == expected


def test_key_extraction_of_repeated_fields() -> None:
    headers = [b"x-user", b": ", b"a", b"\r\n", b"Cookie", b": ", b"x=1", b"\r\n", b"X-USER",
               b": ", b"b", b"\r\n", b"cookie", b": ", b"sid=2; sid=3", b"\r\n"]  # fmt: skip
    assert extract(KeySource.parse("header:X-User"), b"", b"/", headers) == b"a,b"
    assert extract(KeySource.parse("cookie:sid"), b"", b"/", headers) == b"2"
    assert extract(KeySource.parse("cookie:x"), b"", b"/", headers) == b"1"


@pytest.mark.parametrize("spec", ["", "nope", "header", "header:", "ip:x", "cookie: "])
def test_bad_key_sources(spec: str) -> None:
    with pytest.raises(ValueError):
        KeySource.parse(spec)


def test_sticky_pins_with_a_valid_cookie_and_ignores_forged_ones() -> None:
    bs = backends([1, 1, 1])
    cfg = PolicyConfig(name="sticky", key="cookie:poise_sticky", secret="s" * 16)
    a = build(cfg, bs, random.Random(0))
    b = build(cfg, bs, random.Random(1))
    from poise.balancing import StickyPick

    assert isinstance(a, StickyPick) and isinstance(b, StickyPick)
    assert a.values == b.values  # same secret: instances agree
    for i in range(3):
        assert [first(a, a.values[i]).index for _ in range(5)] == [i] * 5
    forged = b"0" * 32
    assert len({first(a, forged).index for _ in range(3)}) == 3  # fallback round robin
    # the value is an opaque id: HMAC-SHA256(secret, "host:port"), 16 bytes in hex; nothing
    # of the backend's address shows
    expected = hmac.new(b"s" * 16, bs[1].id.encode(), hashlib.sha256).hexdigest()[:32]
    assert a.set_cookie(bs[1]) == (
        b"poise_sticky=" + expected.encode() + b"; Path=/; HttpOnly; SameSite=Lax"
    )
    assert all(re.fullmatch(rb"[0-9a-f]{32}", value) for value in a.values)
    other = build(PolicyConfig(name="sticky", key="cookie:poise_sticky", secret="t" * 16),
                  bs, random.Random(0))  # fmt: skip
    assert isinstance(other, StickyPick) and other.values != a.values
