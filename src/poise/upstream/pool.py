"""Keep-alive pool for one backend.

The pool only stores idle connections and forgets them; it never picks backends and never
speaks HTTP. A connection is put back only by its owner, and only when its state is beyond
doubt (the response was complete, framed, and the backend did not ask to close). Idle
connections are kept LIFO: the most recently used is the least likely to have been closed by
the backend, and the cold tail expires by ``idle_timeout``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Generic, Protocol, TypeVar


class Poolable(Protocol):
    idle_since: float

    def usable(self) -> bool: ...

    def close(self) -> None: ...


C = TypeVar("C", bound=Poolable)


class Pool(Generic[C]):
    __slots__ = (
        "connects",
        "idle",
        "idle_timeout",
        "label",
        "max_idle",
        "mux",
        "open",
        "responses",
        "reuses",
    )

    def __init__(self, label: str, max_idle: int, idle_timeout: float) -> None:
        self.label = label
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: list[C] = []
        self.open = 0  # connections alive (idle or busy); maintained by the connections
        self.connects = 0
        self.reuses = 0
        # responses from this backend by status class (index 1-5: 1xx..5xx), for metrics;
        # the pool is the one per-backend object that survives membership changes
        self.responses = [0] * 6
        # HTTP/2 backends (upstream protocol h2 or grpc): the multiplexed connections, each
        # carrying many requests at once (h2/upstream.py), instead of ``idle``
        self.mux: list[Any] = []

    def take(self) -> C | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.usable():
                self.reuses += 1
                return conn
        return None

    def put(self, conn: C, now: float) -> bool:
        """Keep ``conn`` for reuse; False when the pool is full (the caller closes it)."""
        if len(self.idle) >= self.max_idle:
            return False
        conn.idle_since = now
        self.idle.append(conn)
        return True

    def discard(self, conn: C) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def expire(self, now: float) -> None:
        """Close connections idle for longer than ``idle_timeout`` (oldest are at the front)."""
        idle = self.idle
        limit = now - self.idle_timeout
        n = 0
        while n < len(idle) and idle[n].idle_since < limit:
            n += 1
        if n:
            stale, self.idle = idle[:n], idle[n:]
            for conn in stale:
                conn.close()
        for m in [m for m in self.mux if m.idle_since and m.idle_since < limit]:
            m.close()  # an HTTP/2 connection without a stream for as long

    def close_all(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
        mux, self.mux = self.mux, []
        for m in mux:
            m.close()

    def statistics(self) -> dict[str, int]:
        return {
            "idle": len(self.idle),
            "open": self.open,
            "connects": self.connects,
            "reuses": self.reuses,
        }

    def __repr__(self) -> str:
        return f"Pool({self.label}, idle={len(self.idle)}, open={self.open})"
