from __future__ import annotations

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
