from __future__ import annotations

from poise.upstream.pool import Pool


class Conn:
    def __init__(self) -> None:
        self.idle_since = 0.0
        self.closed = False

    def usable(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


def test_lifo_and_unusable_skipped() -> None:
    pool: Pool[Conn] = Pool("t", max_idle=4, idle_timeout=10)
    a, b, c = Conn(), Conn(), Conn()
    for conn in (a, b, c):
        assert pool.put(conn, 0.0)
    c.closed = True
    assert pool.take() is b  # most recent usable first
    assert pool.reuses == 1


def test_bounded_idle() -> None:
    pool: Pool[Conn] = Pool("t", max_idle=1, idle_timeout=10)
    assert pool.put(Conn(), 0.0)
    assert not pool.put(Conn(), 0.0)


def test_expire_closes_only_stale() -> None:
    pool: Pool[Conn] = Pool("t", max_idle=8, idle_timeout=4)
    old, new = Conn(), Conn()
    pool.put(old, 0.0)
    pool.put(new, 3.0)
    pool.expire(5.0)
    assert old.closed and not new.closed
    assert pool.idle == [new]
    pool.close_all()
    assert new.closed and pool.idle == []
