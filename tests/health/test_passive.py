"""Outlier ejection (health/passive.py) on a fake clock."""

from __future__ import annotations

from poise.config.model import PassiveConfig
from poise.health.passive import Outliers


def outliers(n: int = 4, **kw: object) -> Outliers:
    return Outliers(n, PassiveConfig(**kw))  # type: ignore[arg-type]


def test_consecutive_failures_eject_and_success_resets_the_streak() -> None:
    o = outliers(consecutive_failures=3)
    assert not o.failure(0, 0.0, "connect refused")
    assert not o.failure(0, 0.0, "connect refused")
    o.success(0)
    assert o.streak[0] == 0 and not o.any_streak
    assert not o.failure(0, 1.0, "reset")
    assert not o.failure(0, 1.0, "reset")
    assert o.failure(0, 1.0, "reset")
    assert o.ejected[0]
    assert "3 consecutive failures (reset)" in o.reasons[0]
    assert o.until[0] == 1.0 + 30.0
    assert not o.failure(0, 2.0, "reset")  # already out: not counted again


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    o = outliers(consecutive_failures=1, base_ejection=10.0, max_ejection=25.0)
    durations = []
    now = 0.0
    for _ in range(4):
        assert o.failure(1, now, "x")
        durations.append(o.until[1] - now)
        now = o.until[1]
        assert o.expire(now) == [1]
        assert not o.ejected[1]
    assert durations == [10.0, 20.0, 25.0, 25.0]


def test_ejection_count_is_forgiven_after_max_ejection_in_service() -> None:
    o = outliers(consecutive_failures=1, base_ejection=10.0, max_ejection=100.0)
    o.failure(0, 0.0, "x")
    o.expire(10.0)
    o.failure(0, 11.0, "x")  # second: 20 s
    assert o.until[0] == 31.0
    o.expire(31.0)
    o.failure(0, 31.0 + 100.0, "x")  # a long good run since: back to base
    assert o.until[0] == 131.0 + 10.0


def test_never_more_than_max_ejected_percent_but_at_least_one() -> None:
    o = outliers(n=4, consecutive_failures=1, max_ejected_percent=50)
    assert o.failure(0, 0.0, "x")
    assert o.failure(1, 0.0, "x")
    assert not o.failure(2, 0.0, "x")  # 2 of 4 already out
    assert sum(o.ejected) == 2
    one = outliers(n=3, consecutive_failures=1, max_ejected_percent=10)
    assert one.failure(0, 0.0, "x")  # floor(0.3) = 0, but one may always go
    assert not one.failure(1, 0.0, "x")
    none = outliers(n=3, consecutive_failures=1, max_ejected_percent=0)
    assert not none.failure(0, 0.0, "x")


def test_a_backend_held_back_by_the_share_is_ejected_once_there_is_room() -> None:
    o = outliers(n=2, consecutive_failures=1, max_ejected_percent=50, base_ejection=5.0)
    assert o.failure(0, 0.0, "x")
    assert not o.failure(1, 0.0, "x")
    o.expire(5.0)
    assert o.failure(1, 5.0, "x")


def test_retry_after_ejects_for_that_long_capped() -> None:
    o = outliers(max_ejection=60.0)
    assert o.retry_after(2, 100.0, 5.0)
    assert o.until[2] == 105.0
    assert "Retry-After" in o.reasons[2]
    assert o.expire(104.9) == []
    assert o.expire(105.0) == [2]
    assert o.retry_after(3, 0.0, 3600.0)
    assert o.until[3] == 60.0
    off = outliers(retry_after=False)
    assert not off.retry_after(0, 0.0, 5.0)


def test_disabled_passive_health_never_ejects() -> None:
    o = outliers(enabled=False, consecutive_failures=1)
    assert not o.failure(0, 0.0, "x")
    assert not o.retry_after(0, 0.0, 5.0)


def test_reinstate_and_next_expiry_and_describe() -> None:
    o = outliers(consecutive_failures=1)
    assert o.next_expiry() is None
    o.failure(0, 0.0, "x")
    o.failure(1, 1.0, "x")
    assert o.next_expiry() == 30.0
    o.reinstate(0, 2.0)
    assert not o.ejected[0] and o.until[0] == 0.0
    d = o.describe(1, 11.0)
    assert d["ejected"] is True and d["ejected_for"] == 20.0 and d["ejections"] == 1


def test_status_ranges_become_a_set() -> None:
    o = outliers(statuses=((500, 502), (504, 504)))
    assert o.statuses == {500, 501, 502, 504}


def test_a_probe_started_after_a_connection_ejection_lifts_it() -> None:
    o = outliers(consecutive_failures=1)
    assert o.failure(0, 10.0, "connect refused")
    assert not o.probe_passed(0, 9.5, 10.6)  # began before the ejection: says nothing
    assert o.ejected[0]
    assert o.probe_passed(0, 10.2, 10.6)
    assert not o.ejected[0] and o.until[0] == 0.0 and o.returned[0] == 10.6
    assert o.count[0] == 1  # the next ejection still lasts longer
    assert o.failure(0, 11.0, "reset") and o.until[0] == 11.0 + 60.0
    assert not o.probe_passed(1, 20.0, 20.0)  # not ejected: nothing to lift


def test_status_and_retry_after_ejections_are_not_lifted_by_a_probe() -> None:
    o = outliers(consecutive_failures=1)
    assert o.failure(0, 0.0, "status 500", connection=False)
    assert o.retry_after(1, 0.0, 20.0)
    assert not o.probe_passed(0, 1.0, 1.5)
    assert not o.probe_passed(1, 1.0, 1.5)
    assert o.ejected[0] and o.ejected[1]
    # once back, a later connection-level ejection of the same backend is liftable again
    assert o.expire(30.0) == [0, 1]
    assert o.failure(0, 31.0, "connect refused")
    assert o.probe_passed(0, 31.5, 32.0)
