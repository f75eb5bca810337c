"""``SQLiteStore``: the embedded registry's default store, persistent across restarts.

Theory of operation
-------------------
The state lives in memory exactly as in ``MemoryStore``; SQLite is the durable copy. Every
change (register, status change, deregister, expiry) is one transaction written *before* the
change is applied in memory and acknowledged, in WAL mode: once ``register`` has returned,
the row is in the WAL file, and a ``kill -9`` of poise cannot lose it (only an OS crash
could, with ``synchronous=NORMAL``; ``durable=True`` makes every commit fsync, for those who
need that and can pay for it).

Heartbeats are not written at all: they only move a TTL deadline, and 20,000 of them a second
must not mean 20,000 transactions. After a restart every instance gets a fresh TTL from the
moment the store opens (a grace period for its next heartbeat); ones that do not come back
expire then. Revisions continue from the last one written, so watchers resuming from a
revision seen before the restart get exactly what they missed, or ``Compacted``.

The event log is a table pruned to the newest ``history`` rows.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable

from poise.errors import StoreUnavailable
from poise.registry.memory import HISTORY, MemoryStore
from poise.registry.model import Event, Instance

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    service TEXT NOT NULL,
    id TEXT NOT NULL,
    data TEXT NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (service, id)
);
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    service TEXT NOT NULL,
    id TEXT NOT NULL,
    data TEXT,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SQLiteStore(MemoryStore):
    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        history: int = HISTORY,
        durable: bool = False,
    ) -> None:
        super().__init__(clock=clock, history=history)
        self.path = os.fspath(path)
        self.history = history
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            self._load()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"registry database {self.path}: {exc}") from exc
        self.writes = 0

    def _load(self) -> None:
        db = self._db
        row = db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        last = int(row[0]) if row else 0
        now = self.clock()
        for (data,) in db.execute("SELECT data FROM instances ORDER BY service, id"):
            instance = Instance.from_json(json.loads(data))
            key = instance.key
            self._instances[key] = instance
            self._by_service.setdefault(instance.service, {})[instance.id] = instance
            self._service_rev[instance.service] = max(
                self._service_rev.get(instance.service, 0), instance.revision
            )
            if instance.ttl is not None:
                self._deadlines[key] = now + instance.ttl  # grace: a fresh TTL after restart
        rows = db.execute(
            "SELECT revision, kind, service, id, data, reason FROM events "
            "ORDER BY revision DESC LIMIT ?",
            (self.history,),
        ).fetchall()
        for rev, kind, service, iid, data, reason in reversed(rows):
            put = Instance.from_json(json.loads(data)) if data else None
            self._events.append(Event(rev, kind, service, iid, put, reason))
            self._service_rev[service] = max(self._service_rev.get(service, 0), rev)
        self._revision = last
        # history before the oldest kept event (or everything, with none kept) is gone
        self._compacted = self._events[0].revision - 1 if self._events else last

    # -- persistence hooks -----------------------------------------------------------------

    def _persist_put(self, instance: Instance, event: Event) -> None:
        data = json.dumps(instance.to_json(), separators=(",", ":"))
        self._write(
            event,
            data,
            (
                "INSERT OR REPLACE INTO instances (service, id, data, revision) "
                "VALUES (?, ?, ?, ?)",
                (instance.service, instance.id, data, instance.revision),
            ),
        )

    def _persist_delete(self, event: Event) -> None:
        self._write(
            event,
            None,
            ("DELETE FROM instances WHERE service = ? AND id = ?", (event.service, event.id)),
        )

    def _write(
        self, event: Event, data: str | None, change: tuple[str, tuple[object, ...]]
    ) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(*change)
                db.execute(
                    "INSERT INTO events (revision, kind, service, id, data, reason) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (event.revision, event.kind, event.service, event.id, data, event.reason),
                )
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('revision', ?)",
                    (event.revision,),
                )
                if event.revision % 256 == 0:  # prune now and then, not on every write
                    db.execute(
                        "DELETE FROM events WHERE revision <= ?",
                        (event.revision - self.history,),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"registry database {self.path}: {exc}") from exc
        self.writes += 1

    async def close(self) -> None:
        await super().close()
        self._db.close()

    def statistics(self) -> dict[str, object]:
        return {**super().statistics(), "path": self.path, "writes": self.writes}
