"""``MemoryStore``: the registry in this process's memory. The base of ``SQLiteStore``, which
adds persistence through the ``_persist_*`` hooks.

Theory of operation
-------------------
Instances live in a dict keyed by (service, id); TTL deadlines in a separate dict on the
store's clock (wall time by default, so a persistent store can keep them across restarts).
A heartbeat only moves a deadline: no revision, no event, no disk write.

Changes append to a bounded event log (``history`` events). Watchers and blocking queries wait
on one future that is resolved, and replaced, on every change: a change wakes every waiter
once, with no per-waiter bookkeeping. A watcher that falls behind the log gets ``Compacted``.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace

from poise.errors import Compacted, NotRegistered
from poise.registry.model import DELETE, PUT, Event, Instance, check_status
from poise.registry.store import ChangeSignal

HISTORY = 10_000  # events kept for watchers that resume


class MemoryStore:
    name = "memory"

    def __init__(self, *, clock: Callable[[], float] = time.time, history: int = HISTORY) -> None:
        self.clock = clock
        self._instances: dict[tuple[str, str], Instance] = {}
        self._deadlines: dict[tuple[str, str], float] = {}
        self._by_service: dict[str, dict[str, Instance]] = {}
        self._service_rev: dict[str, int] = {}
        self._events: deque[Event] = deque(maxlen=history)
        self._revision = 0
        self._compacted = 0  # events up to this revision are no longer in the log
        self._signal = ChangeSignal()
        self.heartbeats = 0
        self.expired = 0

    # -- the Store protocol ----------------------------------------------------------------

    async def register(self, instance: Instance) -> Instance:
        key = instance.key
        old = self._instances.get(key)
        self._renew(key, instance.ttl)
        if old is not None and old.same_registration(instance):
            return old
        return self._put(instance)

    async def heartbeat(
        self, service: str, instance_id: str, status: str | None = None
    ) -> Instance:
        old = self.beat(service, instance_id)
        if status is None or status == old.status:
            return old
        return self._put(replace(old, status=check_status(status)))

    def beat(self, service: str, instance_id: str) -> Instance:
        """A plain heartbeat, synchronously (it never waits): renew the TTL."""
        key = (service, instance_id)
        old = self._instances.get(key)
        if old is None or self._expired(key):
            raise NotRegistered(service, instance_id)
        self.heartbeats += 1
        self._renew(key, old.ttl)
        return old

    async def deregister(self, service: str, instance_id: str) -> bool:
        key = (service, instance_id)
        if key not in self._instances:
            return False
        self._delete(key, "deregistered")
        return True

    async def instances(self, service: str) -> tuple[tuple[Instance, ...], int]:
        found = self._by_service.get(service, {})
        return tuple(found[i] for i in sorted(found)), self._revision

    async def services(self) -> tuple[dict[str, int], int]:
        return {s: len(i) for s, i in sorted(self._by_service.items())}, self._revision

    async def revision(self) -> int:
        return self._revision

    async def wait(self, after: int, timeout: float, service: str | None = None) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while self._last_change(service) <= after:
            left = deadline - loop.time()
            if left <= 0:
                break
            if not await self._signal.wait(left):
                break
        return self._last_change(service)

    async def watch(self, after: int) -> AsyncGenerator[Event, None]:
        while True:
            if after < self._compacted:
                raise Compacted(after, self._compacted)
            pending = self._since(after)
            if not pending:
                await asyncio.shield(self._signal.next())
                continue
            for event in pending:
                yield event
                after = event.revision

    async def expire(self) -> int:
        now = self.clock()
        due = [key for key, deadline in self._deadlines.items() if deadline <= now]
        for key in due:
            self._delete(key, "expired")
        self.expired += len(due)
        return len(due)

    async def close(self) -> None:
        self._wake()

    def statistics(self) -> dict[str, object]:
        return {
            "store": self.name,
            "revision": self._revision,
            "services": len(self._by_service),
            "instances": len(self._instances),
            "heartbeats": self.heartbeats,
            "expired": self.expired,
            "history": len(self._events),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._instances)} instances, revision {self._revision})"

    # -- internals -------------------------------------------------------------------------

    def _renew(self, key: tuple[str, str], ttl: float | None) -> None:
        if ttl is None:
            self._deadlines.pop(key, None)
        else:
            self._deadlines[key] = self.clock() + ttl

    def _expired(self, key: tuple[str, str]) -> bool:
        deadline = self._deadlines.get(key)
        return deadline is not None and deadline <= self.clock()

    def _put(self, instance: Instance) -> Instance:
        rev = self._revision + 1
        stored = replace(instance, revision=rev)
        event = Event(rev, PUT, stored.service, stored.id, stored)
        self._persist_put(stored, event)  # first: a failed write changes nothing
        self._apply(event)
        return stored

    def _delete(self, key: tuple[str, str], reason: str) -> None:
        event = Event(self._revision + 1, DELETE, key[0], key[1], reason=reason)
        self._persist_delete(event)
        self._apply(event)

    def _apply(self, event: Event) -> None:
        """Fold an event (already persisted) into memory and wake everyone waiting."""
        key = (event.service, event.id)
        self._revision = event.revision
        if event.kind == PUT:
            assert event.instance is not None
            self._instances[key] = event.instance
            self._by_service.setdefault(event.service, {})[event.id] = event.instance
        else:
            self._instances.pop(key, None)
            self._deadlines.pop(key, None)
            found = self._by_service.get(event.service)
            if found is not None:
                found.pop(event.id, None)
                if not found:
                    del self._by_service[event.service]
        self._service_rev[event.service] = event.revision
        if len(self._events) == self._events.maxlen:
            self._compacted = self._events[0].revision
        self._events.append(event)
        self._wake()

    def _since(self, after: int) -> list[Event]:
        events = self._events
        if not events or events[-1].revision <= after:
            return []
        i = bisect.bisect_right(events, after, key=lambda e: e.revision)
        return [events[j] for j in range(i, len(events))]

    def _last_change(self, service: str | None) -> int:
        return self._revision if service is None else self._service_rev.get(service, 0)

    def _wake(self) -> None:
        self._signal.wake()

    # persistence hooks (SQLiteStore): called before memory changes; raising aborts the change

    def _persist_put(self, instance: Instance, event: Event) -> None:
        pass

    def _persist_delete(self, event: Event) -> None:
        pass
