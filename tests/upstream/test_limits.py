"""The admission queue of an upstream group (upstream/limits.py), without sockets."""

from __future__ import annotations

from collections.abc import Callable

from poise.config.model import UpstreamLimitsConfig
from poise.upstream.limits import Admission


class W:
    def __init__(self, log: list[str], name: str) -> None:
        self.log = log
        self.name = name
        self.left = False

    def resume(self) -> None:
        self.log.append(f"resume {self.name}")

    def expire(self) -> None:
        self.log.append(f"expire {self.name}")

    def gone(self) -> bool:
        return self.left


def admission(**kw: object) -> tuple[Admission, list[Callable[[], None]]]:
    scheduled: list[Callable[[], None]] = []
    adm = Admission("app", UpstreamLimitsConfig(**kw), scheduled.append)  # type: ignore[arg-type]
    return adm, scheduled


def test_limits_per_group_and_per_backend() -> None:
    adm, _ = admission(max_requests=2, max_requests_per_backend=1)
    assert not adm.group_full() and not adm.backend_full(0)
    assert adm.backend_full(1)
    adm.active = 2
    assert adm.group_full()
    unlimited, _ = admission()
    unlimited.active = 10**6
    assert not unlimited.group_full() and not unlimited.backend_full(10**6)


def test_queue_is_bounded_and_fifo_and_wakes_on_the_next_iteration() -> None:
    log: list[str] = []
    adm, scheduled = admission(max_requests=1, max_pending=2)
    adm.active = 1
    a, b, c = W(log, "a"), W(log, "b"), W(log, "c")
    assert adm.park(a, 0.0) and adm.park(b, 0.0)
    assert not adm.park(c, 0.0)
    assert adm.full == 1
    adm.released()
    adm.released()  # one wake-up scheduled, not two
    assert log == [] and len(scheduled) == 1
    scheduled.pop()()
    assert log == ["resume a"]
    assert adm.active == -1  # released twice from 1: the owner counts the resumed one in
    assert [w for _, w in adm.waiting] == [b]


def test_waiters_that_left_are_skipped_and_timeouts_expire_in_order() -> None:
    log: list[str] = []
    adm, scheduled = admission(max_requests=1, queue_timeout=5.0)
    a, b, c = W(log, "a"), W(log, "b"), W(log, "c")
    adm.park(a, 0.0)
    adm.park(b, 1.0)
    adm.park(c, 2.0)
    a.left = True
    adm.active = 1
    adm.released()
    scheduled.pop()()
    assert log == ["resume b"]
    adm.expire(6.5)  # c's deadline is 7.0
    assert log == ["resume b"]
    adm.expire(7.5)
    assert log == ["resume b", "expire c"]
    assert adm.queue_timeouts == 1 and not adm.waiting


def test_park_first_keeps_the_original_deadline() -> None:
    log: list[str] = []
    adm, _ = admission(queue_timeout=5.0)
    a, b = W(log, "a"), W(log, "b")
    adm.park(b, 3.0)
    adm.park_first(a, 4.0)
    assert [w for _, w in adm.waiting] == [a, b]
    adm.expire(4.5)
    assert log == ["expire a"]
