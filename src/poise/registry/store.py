"""The ``Store`` protocol every registry backend implements (memory, SQLite, etcd).

Contract (checked for each store by ``poise.testing.check_store``):

* ``register`` creates or replaces an instance and starts its TTL; a registration identical
  to the stored one renews the TTL and is not a change (no new revision, no event).
* ``heartbeat`` renews the TTL; with a ``status`` different from the stored one it is a change.
  It raises ``NotRegistered`` for an unknown (or expired) instance, so a client knows to
  register again (after a registry restart, say).
* ``deregister`` removes; True when there was something to remove.
* Every change takes the next revision; ``revision()`` is the latest. Revisions only grow,
  also across restarts of a persistent store.
* ``instances(service)`` and ``services()`` return a consistent snapshot with the revision it
  is at. ``wait(after, timeout, service=None)`` returns as soon as the revision (or, with
  ``service``, that service's last change) is beyond ``after``, or when ``timeout`` passes:
  the primitive behind blocking queries.
* ``watch(after)`` yields every event with a revision beyond ``after``, in order, then waits
  for more, forever. Raises ``Compacted`` when that history is no longer kept: the watcher
  then lists again and watches from the listed revision.
* ``expire()`` removes instances whose TTL ran out (events with reason ``expired``); stores
  whose backend expires by itself (etcd leases) do nothing. The owner calls it on a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Protocol

from poise.registry.model import Event, Instance


class Store(Protocol):
    name: str  # "memory", "sqlite", "etcd" (for statistics and logs)

    async def register(self, instance: Instance) -> Instance: ...

    async def heartbeat(
        self, service: str, instance_id: str, status: str | None = None
    ) -> Instance: ...

    async def deregister(self, service: str, instance_id: str) -> bool: ...

    async def instances(self, service: str) -> tuple[tuple[Instance, ...], int]: ...

    async def services(self) -> tuple[dict[str, int], int]: ...

    async def revision(self) -> int: ...

    async def wait(self, after: int, timeout: float, service: str | None = None) -> int: ...

    def watch(self, after: int) -> AsyncGenerator[Event, None]: ...

    async def expire(self) -> int: ...

    async def close(self) -> None: ...

    def statistics(self) -> dict[str, object]: ...


class ChangeSignal:
    """How a store wakes its waiters (blocking queries, watches): one future, resolved and
    replaced on every change, so a change wakes every waiter once with no per-waiter
    bookkeeping."""

    __slots__ = ("_changed",)

    def __init__(self) -> None:
        self._changed: asyncio.Future[None] | None = None

    def next(self) -> asyncio.Future[None]:
        """The future the next change resolves (shield it: it is shared)."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    async def wait(self, timeout: float) -> bool:
        """Until the next change (True) or ``timeout`` seconds (False)."""
        try:
            await asyncio.wait_for(asyncio.shield(self.next()), max(timeout, 0.0))
        except TimeoutError:
            return False
        return True

    def wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)
