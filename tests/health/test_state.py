from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poise.health.state import Health, HealthState, ProbeResult

OK = ProbeResult(ok=True, reason="status 200")
BAD = ProbeResult(ok=False, reason="connect refused")


def test_starts_up_and_falls_after_fall_failures() -> None:
    s = HealthState(rise=2, fall=3)
    assert s.up
    assert s.observe(BAD) is None
    assert s.observe(BAD) is None
    assert s.observe(BAD) is Health.DOWN
    assert not s.up
    assert s.reason == "connect refused"


def test_rises_after_rise_successes() -> None:
    s = HealthState(rise=2, fall=1)
    assert s.observe(BAD) is Health.DOWN
    assert s.observe(OK) is None
    assert not s.up
    assert s.observe(OK) is Health.UP
    assert s.reason == "status 200"


def test_streaks_reset_by_a_contrary_result() -> None:
    s = HealthState(rise=1, fall=2)
    s.observe(BAD)
    s.observe(OK)  # resets the failure streak
    assert s.observe(BAD) is None
    assert s.up
    assert s.observe(BAD) is Health.DOWN


def test_seed_behaviour_one_probe_each_way() -> None:
    s = HealthState(rise=1, fall=1)
    assert s.observe(BAD) is Health.DOWN
    assert s.observe(OK) is Health.UP


def test_history_is_bounded() -> None:
    s = HealthState(rise=1, fall=1, history_size=3)
    for _ in range(10):
        s.observe(OK)
    assert len(s.history) == 3


def test_history_keeps_the_latest_results_oldest_first() -> None:
    s = HealthState(rise=1, fall=1, history_size=3)
    results = [ProbeResult(ok=i % 2 == 0, reason=f"r{i}", latency=i / 1000, at=100.0 + i)
               for i in range(5)]  # fmt: skip
    for r in results:
        s.observe(r)
    assert list(s.history) == results[-3:]
    assert s.history_dicts() == [
        {"ok": True, "reason": "r2", "latency_ms": 2.0, "at": 102.0},
        {"ok": False, "reason": "r3", "latency_ms": 3.0, "at": 103.0},
        {"ok": True, "reason": "r4", "latency_ms": 4.0, "at": 104.0},
    ]


def test_history_of_one_and_invalid_size() -> None:
    s = HealthState(rise=1, fall=1, history_size=1)
    s.observe(BAD)
    s.observe(OK)
    assert [r.reason for r in s.history] == ["status 200"]
    with pytest.raises(ValueError, match="history_size"):
        HealthState(rise=1, fall=1, history_size=0)


def test_probe_result_as_dict_rounds_for_display() -> None:
    r = ProbeResult(ok=True, reason="status 200", latency=0.0123456, at=1700000000.123456)
    assert r.as_dict() == {
        "ok": True,
        "reason": "status 200",
        "latency_ms": 12.346,
        "at": 1700000000.123,
    }


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_invariants_hold_for_any_sequence(results: list[bool], rise: int, fall: int) -> None:
    s = HealthState(rise=rise, fall=fall)
    for ok in results:
        before = s.health
        changed = s.observe(OK if ok else BAD)
        assert not (s.successes and s.failures)
        if s.up:
            assert s.failures < fall
        else:
            assert s.successes < rise
        assert (changed is not None) == (before is not s.health)
    # the state equals what the last max(rise, fall) results alone would force
    tail = results[-max(rise, fall) :]
    if len(tail) >= fall and not any(tail[-fall:]):
        assert not s.up
    if len(tail) >= rise and all(tail[-rise:]):
        assert s.up
