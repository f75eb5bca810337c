"""The view of a group's backends (health/status.py): panic, drain, maint, slow start."""

from __future__ import annotations

import dataclasses

from poise.config import parse_config
from poise.health.status import GroupStatus


def status(n: int = 4, **up: object) -> GroupStatus:
    doc = {
        "listeners": [{"listen": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {
            "app": {"backends": [f"http://127.0.0.1:{5000 + i}" for i in range(n)], **up}
        },
    }
    return GroupStatus(parse_config(doc).upstreams["app"])


def test_usable_backends_are_up() -> None:
    s = status()
    s.set_health((True, False, True, True), 0.0)
    v = s.view(0.0)
    assert v.up == (True, False, True, True)
    assert not v.panic and v.sticky_ok is None and v.ramp is None


def test_panic_below_threshold_routes_to_every_enabled_backend() -> None:
    s = status(panic_threshold=50)
    s.set_health((True, False, False, False), 0.0)  # 25% < 50%
    v = s.view(0.0)
    assert v.panic
    assert v.up == (True, True, True, True)
    assert v.healthy == (True, False, False, False)  # where a retry goes first
    s.set_health((True, True, False, False), 1.0)  # 50% is not below 50%
    assert not s.view(1.0).panic


def test_no_panic_without_any_healthy_backend_nor_with_threshold_zero() -> None:
    s = status(panic_threshold=50)
    s.set_health((False,) * 4, 0.0)
    v = s.view(0.0)
    assert not v.panic and not any(v.up)
    z = status(panic_threshold=0)
    z.set_health((True, False, False, False), 0.0)
    assert z.view(0.0).up == (True, False, False, False)


def test_panic_mode_is_off_by_default() -> None:
    s = status()
    s.set_health((True, False, False, False), 0.0)
    v = s.view(0.0)
    assert not v.panic and v.healthy is None
    assert v.up == (True, False, False, False)


def test_panic_excludes_backends_in_maintenance() -> None:
    s = status(panic_threshold=50)
    s.set_admin(3, "maint")
    s.set_health((True, False, False, True), 0.0)  # 1 usable of 3 enabled
    v = s.view(0.0)
    assert v.panic
    assert v.up == (True, True, True, False)


def test_ejected_backends_are_not_up_and_active_recovery_reinstates() -> None:
    s = status(passive={"consecutive_failures": 1})
    s.outliers.failure(1, 0.0, "reset")
    assert s.view(0.0).up == (True, False, True, True)
    s.set_health((True, False, True, True), 1.0)
    s.set_health((True, True, True, True), 2.0)  # DOWN -> UP in the active checks
    assert not s.outliers.ejected[1]
    assert s.view(2.0).up == (True,) * 4


def test_drain_takes_no_new_requests_but_sticky_ones() -> None:
    s = status()
    s.set_admin(0, "drain")
    s.set_admin(1, "maint")
    v = s.view(0.0)
    assert v.up == (False, False, True, True)
    assert v.sticky_ok == (True, False, True, True)
    s.set_health((False, True, True, True), 1.0)
    assert s.view(1.0).sticky_ok == (False, False, True, True)  # unhealthy: not even sticky


def test_unknown_admin_state_is_refused() -> None:
    s = status()
    try:
        s.set_admin(0, "off")
    except ValueError as exc:
        assert "unknown backend state" in str(exc)
    else:
        raise AssertionError("accepted an unknown state")


def test_slow_start_ramps_linearly_from_a_floor_after_recovery() -> None:
    s = status(n=2, slow_start="10s")
    assert s.view(0.0).ramp is None  # usable from the start: no ramp
    s.set_health((True, False), 1.0)
    s.view(1.0)
    s.set_health((True, True), 100.0)
    assert s.view(100.0).ramp == (1.0, 0.1)  # just back: the floor
    ramp = s.view(105.0).ramp
    assert ramp is not None and abs(ramp[1] - 0.5) < 1e-9
    assert s.view(110.0).ramp is None  # done


def test_slow_start_after_maintenance_and_ejection() -> None:
    s = status(
        n=2,
        slow_start="4s",
        passive={"consecutive_failures": 1, "base_ejection": "1s", "max_ejection": "1s"},
    )
    s.set_admin(0, "maint")
    s.view(0.0)
    s.set_admin(0, "enabled")
    ramp = s.view(1.0).ramp
    assert ramp is not None and ramp[0] == 0.1
    s.outliers.failure(1, 2.0, "x")
    s.view(2.0)
    s.outliers.expire(3.0)
    s.view(3.0)  # the board refreshes the view right after ending an ejection
    ramp = s.view(4.0).ramp
    assert ramp is not None and abs(ramp[1] - 0.25) < 1e-9
    assert dataclasses.asdict(s.view(4.0))["panic"] is False


def test_a_successor_without_active_checks_counts_every_backend_healthy() -> None:
    s = status(n=2)
    s.set_health((False, True), 0.0)
    ids = ["127.0.0.1:5000", "127.0.0.1:5001"]
    kept = s.successor(s.cfg, ids, ids, [True, True])
    assert kept.view(1.0).up == (False, True)  # the checks still run: the verdict holds
    off = dataclasses.replace(s.cfg.health_check, enabled=False)
    cfg = dataclasses.replace(s.cfg, health_check=off)
    unchecked = s.successor(cfg, ids, ids, [True, True])
    assert unchecked.view(1.0).up == (True, True)
    assert unchecked.healthy == [True, True]
