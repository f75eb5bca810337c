"""The registry inside a running poise: opens the store, expires lapsed instances on a timer,
and follows the services that upstreams name, reporting each change of their instances.

Theory of operation
-------------------
Following is a loop of blocking waits, not an event-by-event replay: wait until the store's
revision moves past the last one seen, then list each followed service and report those whose
instances differ from what was last reported. A burst of 1,000 registrations therefore costs a
handful of routing-table rebuilds, not 1,000, and nothing can be missed: the revision read
before listing is the one waited on next, so a change made while listing wakes the loop again.

When the store cannot be reached (etcd down), the last known instances stay in force (poise
keeps routing to them), the failure is logged once and shown in ``statistics()``, and the loop
retries with a capped backoff until the store is back; then it catches up with one listing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable

from poise.config.model import RegistryConfig
from poise.errors import RegistryError
from poise.registry.memory import MemoryStore
from poise.registry.model import Instance
from poise.registry.store import Store

log = logging.getLogger("poise.registry")

EXPIRE_TICK = 0.25  # seconds between TTL sweeps (local stores)
WAIT = 30.0  # seconds per blocking wait (then it simply waits again)
LAG = 0.005  # seconds before listing again when a listing was older than the wake-up
BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0)  # seconds between tries while the store is unreachable

OnChange = Callable[[str, tuple[Instance, ...]], None]


def open_store(cfg: RegistryConfig) -> Store:
    """The store ``cfg`` names. SQLite opens (and creates) its file here."""
    if cfg.store == "memory":
        return MemoryStore(history=cfg.history)
    if cfg.store == "sqlite":
        from poise.registry.sqlite import SQLiteStore

        return SQLiteStore(cfg.path, history=cfg.history, durable=cfg.durable)
    from poise.registry import etcd  # type: ignore[attr-defined,unused-ignore]

    node = cfg.node
    if node is None and cfg.listen is not None and cfg.listen[1]:
        node = f"{socket.gethostname()}:{cfg.listen[1]}"  # stable: a restart adopts its own
    store: Store = etcd.EtcdStore(
        cfg.endpoints,
        prefix=cfg.prefix,
        node=node,
        advertise=cfg.advertise,
        token=cfg.token,
        node_ttl=cfg.node_ttl,
    )
    return store


def advertise_url(host: str, port: int) -> str:
    """The URL other poise nodes reach a registry API bound to ``host``:``port`` at."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class RegistryService:
    def __init__(self, cfg: RegistryConfig, store: Store | None = None) -> None:
        self.cfg = cfg
        self.store = store if store is not None else open_store(cfg)
        self.reported: dict[str, tuple[Instance, ...]] = {}
        self.revision = 0  # the revision the followed services were last listed at
        self.reachable = True
        self.last_error = ""
        self.changes = 0  # reports of changed instances
        self.listed_at = 0.0  # time.time() of the last successful listing

    def api_bound(self, host: str, port: int) -> None:
        """The registry API listens at ``host``:``port``: a store shared by several nodes (etcd)
        tells the others that address, unless ``registry.advertise`` named one."""
        store = self.store
        if getattr(store, "advertise", "") is None:
            store.advertise = advertise_url(host, port)  # type: ignore[attr-defined]

    async def snapshot(self, services: Iterable[str]) -> dict[str, tuple[Instance, ...]]:
        """List ``services`` now (at start-up, before serving); remembered as reported."""
        rev = await self.store.revision()
        for service in services:
            self.reported[service], _ = await self.store.instances(service)
        self.revision = rev
        self.listed_at = time.time()
        return dict(self.reported)

    async def follow(self, services: Iterable[str], on_change: OnChange) -> None:
        """Report every change of the instances of ``services``, until cancelled."""
        followed = sorted(set(services))
        failures = 0
        while True:
            try:
                rev = await self.store.wait(self.revision, WAIT)
                if rev != self.revision or not self.reachable:
                    listed = rev
                    for service in followed:
                        instances, at = await self.store.instances(service)
                        # a listing may be older than what woke us (etcd: a node's copy
                        # one event behind): wait next from the oldest, so nothing is missed
                        listed = min(listed, at)
                        if instances != self.reported.get(service):
                            self.reported[service] = instances
                            self.changes += 1
                            on_change(service, instances)
                    self.revision = listed
                    if listed < rev:
                        await asyncio.sleep(LAG)  # let the listing catch up, then list again
                    self.listed_at = time.time()
                if not self.reachable:
                    log.warning("registry store %s reachable again; caught up at revision %d",
                                self.store.name, rev)  # fmt: skip
                    self.reachable, self.last_error, failures = True, "", 0
            except RegistryError as exc:
                if self.reachable:
                    log.error("registry store %s unreachable (%s): routing to the last known "
                              "instances until it is back", self.store.name, exc)  # fmt: skip
                self.reachable, self.last_error = False, str(exc)
                await asyncio.sleep(BACKOFF[min(failures, len(BACKOFF) - 1)])
                failures += 1

    async def expire_forever(self) -> None:
        """Sweep TTLs on a timer (stores that expire by themselves return at once)."""
        while True:
            await asyncio.sleep(EXPIRE_TICK)
            try:
                gone = await self.store.expire()
            except RegistryError as exc:
                log.debug("registry expiry sweep failed: %s", exc)
                continue
            if gone:
                log.info("registry: %d instance(s) expired (no heartbeat within their TTL)", gone)

    async def close(self) -> None:
        await self.store.close()

    def statistics(self) -> dict[str, object]:
        return {
            **self.store.statistics(),
            "reachable": self.reachable,
            "last_error": self.last_error,
            "followed": {s: len(i) for s, i in self.reported.items()},
            "listed_revision": self.revision,
            "listed_at": self.listed_at,
            "changes": self.changes,
        }

    def __repr__(self) -> str:
        return f"RegistryService({self.store!r}, following {len(self.reported)} services)"
