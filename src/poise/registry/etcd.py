"""``EtcdStore``: the registry kept in etcd v3, shared by several poise nodes, spoken to through
etcd's JSON gateway over HTTP (``EtcdGateway`` in ``poise.registry.etcdhttp``: members,
requests, failover).

Theory of operation
-------------------
**Keys.** An instance is the key ``{prefix}/instances/{service}/{id}`` holding
``Instance.to_json()`` plus ``"node"``, the poise node that holds its TTL (its ``revision``
written as 0: the real one is the key's ``mod_revision``). A node that holds TTLs has the key
``{prefix}/nodes/{node}`` (its registry API's address, for forwarded heartbeats). A
deregistration also writes ``{prefix}/deregistered/{service}/{id}`` in the transaction that
deletes the instance (see *Expiry*). Nothing else is written.

**Revisions** are etcd's own: an instance's revision is its key's ``mod_revision``; the store's
revision is the latest etcd revision it has seen. They only grow and are the same on every
node, which is what lets two poise nodes agree on "where they are".

**A session per node; TTLs held in memory** (as Consul's agents hold their checks). A node
keeps one etcd lease of its own (``node_ttl``, 10 s by default, kept alive every third of it).
An instance registered with a TTL through this node is written once, on that lease, naming
this node as its owner, and its TTL deadline lives in this node's memory. A heartbeat moves
that deadline and nothing else: no etcd call, no revision, no event. Only changes are written:
a registration that differs, a status change, a deregistration, and an expiry (the owner
deletes the key when the deadline passes, in ``expire()``). An instance without a TTL has no
owner and no lease: it stays until deregistered.

**Node death.** When a node dies its lease runs out (within ``node_ttl``) and etcd deletes
every key on it: its instances leave every node's routing, as expired. A node that restarts
under the same name within ``node_ttl`` finds its keys still there and moves them to its new
lease (*adoption*, with fresh deadlines), so a restart loses nothing. Closing a store does not
revoke its lease, for the same reason.

**A heartbeat that lands on another node** (instances behind a VIP or DNS over the nodes) is
answered at once from the mirror and *forwarded*: each node batches the heartbeats it holds
for another node and sends them to that node's registry API (``POST
/v1/internal/heartbeats``), one request in flight per destination, so under load a request
carries many. The owner moves the deadlines. Ownership does not move, so heartbeats that
alternate between nodes cost etcd nothing and nothing flaps. If the owner cannot be reached,
or its node key is gone (it died), the node *takes the instance over*: a transaction guarded
by the key's ``mod_revision`` moves the key to this node's lease with a fresh deadline. The
instance is kept, and a second node trying the same loses the guard and forwards instead.

**The mirror.** Every node lists ``{prefix}/`` once and then watches it, keeping instances and
nodes in memory. Listings, blocking waits and the follow loop that feeds routing answer from
it: a registration on node A reaches node B's routing one etcd watch event later. A store's
own writes are visible to its own reads at once (a read waits for the mirror to pass the
revision of the store's last write). While the mirror is not in sync (etcd unreachable), reads
go to etcd and fail as ``StoreUnavailable``; heartbeats of owned instances keep working.

**Expiry vs deregistration.** Both reach watchers as a DELETE of the instance key. Deregister
deletes it in a transaction that also puts the tombstone key, so both events carry the same
revision and arrive in the same watch response. A DELETE with a tombstone beside it is
``deregistered``; one without is ``expired`` (an owner's expiry, a node's lease running out).
The tombstone is deleted right after; watchers ignore tombstone deletes. It is put on the
node's lease, so one left by a crash between the two steps goes with the node.

**No change, no revision.** Every write is a transaction guarded by the ``mod_revision`` last
seen (or "absent"), whose failure branch reads the key: a concurrent writer makes it fail, and
we decide again from what is really stored, in the same round trip. An identical
re-registration is recognised against what is stored and only renews the TTL, also under
concurrency and after a retried request that had in fact been applied.

**Watch and wait.** ``watch(after)`` is an etcd watch on ``{prefix}/`` from ``after + 1``. A
dropped stream is reopened from the revision after the last delivered one, so nothing is lost
or repeated. A compacted start revision raises ``Compacted``.

**Endpoints and failures** are the gateway's (``poise.registry.etcdhttp``): a call goes to
the next member when one fails and is retried until ``timeout``; then ``StoreUnavailable``,
and the store is *known down* (calls fail at once) until a background probe reaches a member
again. If the node's lease ran out meanwhile, the node takes a new one and writes its live
instances back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from poise.errors import Compacted, NotRegistered, RegistryError, StoreUnavailable
from poise.registry.etcdhttp import KV, NOT_FOUND, EtcdError, EtcdGateway, translate
from poise.registry.etcdwire import WireClient, WireError
from poise.registry.model import DELETE, PUT, Event, Instance, check_status
from poise.registry.store import ChangeSignal

__all__ = ["EtcdStore"]

log = logging.getLogger("poise.registry.etcd")

MIN_LEASE = 2  # seconds: etcd's minimum lease TTL with its default election timeout
NODE_TTL = 10.0  # seconds: the node lease; a dead node's instances go within this
RETRIES = 20  # read-decide-write rounds lost to concurrent writers before giving up
BATCH = 64  # keys per transaction when many change at once (etcd allows 128 operations)
FORWARD_BYTES = 60_000  # of heartbeats per forwarding request (the registry API takes 64 KiB)
FORWARD_TIMEOUT = 1.0  # seconds for a node to answer forwarded heartbeats
CATCH_UP = 2.0  # seconds a read waits for the mirror to reach the store's own last write
MIRROR_BACKOFF = (0.05, 0.1, 0.25, 0.5, 1.0)  # seconds between tries to rebuild the mirror
Key = tuple[str, str]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _range_end(prefix: str) -> str:
    """The first key after every key starting with ``prefix`` (prefixes here end in '/')."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def lease_ttl(ttl: float) -> int:
    return max(MIN_LEASE, math.ceil(ttl))


def _guard(path: str, mod: int | None) -> KV:
    """The compare of a guarded write: the key is still at ``mod`` (None: absent)."""
    if mod is None:
        return {"key": path, "result": "EQUAL", "target": "CREATE", "create_revision": "0"}
    return {"key": path, "result": "EQUAL", "target": "MOD", "mod_revision": str(mod)}


@dataclass(slots=True)
class _Entry:
    """One instance key as etcd holds it (the mirror's view)."""

    instance: Instance  # revision: the key's mod_revision
    node: str  # the node holding its TTL ("": none)
    lease: int


@dataclass(slots=True)
class _Owned:
    """An instance whose TTL this node holds."""

    instance: Instance
    lease: int
    deadline: float  # on the store's clock


@dataclass(slots=True)
class _Node:
    api: str | None  # its registry API, for forwarded heartbeats
    lease: int


class EtcdStore:
    name = "etcd"

    def __init__(
        self,
        endpoints: str | Sequence[str] = "http://127.0.0.1:2379",
        *,
        prefix: str = "/poise",
        timeout: float = 5.0,
        attempt_timeout: float = 2.0,
        node: str | None = None,
        advertise: str | None = None,
        token: str | None = None,
        node_ttl: float = NODE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        eps = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not eps:
            raise ValueError("EtcdStore needs at least one endpoint")
        self.prefix = prefix.rstrip("/")
        self._root = f"{self.prefix}/"
        self._instances = f"{self.prefix}/instances/"
        self._tombstones = f"{self.prefix}/deregistered/"
        self._nodes_prefix = f"{self.prefix}/nodes/"
        probe = {"key": _b64(self._instances), "range_end": _b64(_range_end(self._instances)),
                 "count_only": True}  # fmt: skip
        self.gateway = EtcdGateway(
            eps, timeout=timeout, attempt_timeout=attempt_timeout, probe=probe
        )
        # this node: its name (stable across restarts, so a restart adopts its instances),
        # where other nodes reach its registry API, and the bearer token they send
        self.node = node or f"poise-{uuid.uuid4().hex[:12]}"
        self.advertise = advertise
        self.token = token
        self.node_ttl = float(lease_ttl(node_ttl))
        self.clock = clock
        # the mirror: what etcd holds under the prefix, as of ``_mirror_rev``
        self._mirror: dict[Key, _Entry] = {}
        self._by_service: dict[str, dict[str, _Entry]] = {}
        self._service_rev: dict[str, int] = {}
        self._nodes: dict[str, _Node] = {}
        self._mirror_rev = 0
        self._live = False  # the mirror is in sync with etcd's watch
        self._signal = ChangeSignal()
        self._started: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # this node's session and the TTLs it holds
        self._lease = 0
        self._session: asyncio.Lock | None = None
        self._owned: dict[Key, _Owned] = {}
        self._orphans: set[Key] = set()  # held, but deleted in etcd without a deregistration
        self._checking: asyncio.Task[None] | None = None
        # the newest revision of this prefix this store has written or acted on: reads wait
        # for the mirror to reach it (read-your-writes, and a listing after a wait)
        self._must_see = 0
        # heartbeats waiting to be forwarded, by owning node
        self._forward: dict[str, set[Key]] = {}
        self._forwarding: dict[str, asyncio.Task[None]] = {}
        self._peers = WireClient(limit=16)  # to other nodes' registry APIs
        self._closed = False
        self.last_revision = 0
        self.heartbeats = 0
        self.forwarded = 0  # heartbeats sent on to their owner
        self.received = 0  # heartbeats other nodes sent us
        self.takeovers = 0
        self.adopted = 0
        self.expired = 0
        self.writes = 0  # etcd transactions that changed something
        self.sessions = 0  # node leases taken (1, unless one ran out)

    # -- the Store protocol ----------------------------------------------------------------

    async def register(self, instance: Instance) -> Instance:
        await self._ensure()
        key = instance.key
        seen = self._known(key)
        for _ in range(RETRIES):
            same = seen is not None and seen.instance.same_registration(instance)
            if same:
                seen = await self._read(key)  # what we knew may be behind: decide on etcd's
                same = seen is not None and seen.instance.same_registration(instance)
            if same and seen is not None:
                # identical: nothing to write; renew the TTL where it is held
                await self._know_node(seen.node)
                if self._renew(key, seen):
                    return seen.instance
                lease = await self._lease_id()
                if seen.node == self.node and seen.lease == lease:
                    self._hold(key, seen.instance, lease)
                    return seen.instance
                # its owner is gone: take it over below (the same content, a new revision)
            lease = await self._lease_id() if instance.ttl is not None else 0
            mod = None if seen is None else seen.instance.revision
            applied, seen = await self._txn(key, mod, [self._put_op(key, instance, lease)])
            if applied:
                self.takeovers += same
                stored = replace(instance, revision=applied)
                if lease:
                    self._hold(key, stored, lease)
                else:
                    self._owned.pop(key, None)
                return stored
        raise StoreUnavailable(f"etcd: {self._path(key)} changed {RETRIES} times while registering")

    async def heartbeat(
        self, service: str, instance_id: str, status: str | None = None
    ) -> Instance:
        await self._ensure()
        key = (service, instance_id)
        try:
            got = self.beat(service, instance_id)
        except NotRegistered:
            got = await self._claim(key)
        if status is None or status == got.status:
            return got
        # a status change is a write: this node writes it, and holds the TTL from now on
        check_status(status)
        seen = self._known(key)
        if seen is None or seen.instance.revision != got.revision:
            seen = await self._read(key)
        for _ in range(RETRIES):
            if seen is None:
                self._owned.pop(key, None)
                raise NotRegistered(service, instance_id)
            new = replace(seen.instance, status=status)
            lease = await self._lease_id() if new.ttl is not None else 0
            applied, seen = await self._txn(
                key, seen.instance.revision, [self._put_op(key, new, lease)]
            )
            if applied:
                stored = replace(new, revision=applied)
                if lease:
                    self._hold(key, stored, lease)
                return stored
        raise StoreUnavailable(
            f"etcd: {self._path(key)} changed {RETRIES} times during a heartbeat"
        )

    def beat(self, service: str, instance_id: str) -> Instance:
        """A plain heartbeat, synchronously: renew the TTL where it is held (here, or on the
        owning node by a forwarded heartbeat). ``NotRegistered`` when it cannot be decided
        here and now (unknown here, expired, its owner gone): ``heartbeat()`` decides."""
        key = (service, instance_id)
        own = self._owned.get(key)
        if own is not None:
            now = self.clock()
            if own.deadline <= now:
                raise NotRegistered(service, instance_id)
            own.deadline = now + (own.instance.ttl or 0.0)
            self.heartbeats += 1
            return own.instance
        seen = self._mirror.get(key)
        if seen is None or not self._renew(key, seen):
            raise NotRegistered(service, instance_id)
        self.heartbeats += 1
        return seen.instance

    def receive_beats(self, keys: Iterable[Key]) -> list[Key]:
        """Heartbeats another node forwarded: renew those held here; the others are
        returned (not ours: taken over, expired, deregistered)."""
        now = self.clock()
        refused = []
        for key in keys:
            own = self._owned.get(key)
            if own is None or own.deadline <= now:
                refused.append(key)
                continue
            own.deadline = now + (own.instance.ttl or 0.0)
            self.received += 1
        return refused

    async def deregister(self, service: str, instance_id: str) -> bool:
        await self._ensure()
        key = (service, instance_id)
        path = self._path(key)
        tomb = f"{self._tombstones}{service}/{instance_id}"
        seen = self._known(key)
        for _ in range(RETRIES):
            if seen is None:
                seen = await self._read(key)
                if seen is None:
                    self._owned.pop(key, None)
                    return False
            tomb_put: KV = {"key": _b64(tomb), "value": _b64("deregistered")}
            if self._lease:
                tomb_put["lease"] = str(self._lease)
            ops = [{"request_put": tomb_put}, {"request_delete_range": {"key": _b64(path)}}]
            was = seen.instance.revision
            applied, seen = await self._txn(key, was, ops)
            if not applied and seen is None:
                # gone meanwhile; a tombstone newer than what we saw means a deregistration
                # (maybe our own, retried after its answer was lost): finish it
                kvs = (await self._range(tomb)).get("kvs", ())
                applied = int(kvs[0]["mod_revision"]) if kvs else 0
                if applied <= was:
                    self._owned.pop(key, None)
                    return False
            if applied:
                self._owned.pop(key, None)
                await self._write("/v3/kv/deleterange", {"key": _b64(tomb)})
                return True
        raise StoreUnavailable(f"etcd: {path} changed {RETRIES} times while deregistering")

    async def instances(self, service: str) -> tuple[tuple[Instance, ...], int]:
        await self._ensure()
        if await self._caught_up():
            found = self._by_service.get(service, {})
            return tuple(found[i].instance for i in sorted(found)), self._mirror_rev
        data = await self._range(f"{self._instances}{service}/", prefix=True)
        found_kvs = (self._decode(kv).instance for kv in data.get("kvs", ()))
        return tuple(sorted(found_kvs, key=lambda i: i.id)), self._revision_of(data)

    async def services(self) -> tuple[dict[str, int], int]:
        await self._ensure()
        if await self._caught_up():
            counts = {s: len(i) for s, i in sorted(self._by_service.items()) if i}
            return counts, self._mirror_rev
        data = await self._range(self._instances, prefix=True, keys_only=True)
        counts = {}
        for kv in data.get("kvs", ()):
            service = _unb64(kv["key"])[len(self._instances) :].split("/", 1)[0]
            counts[service] = counts.get(service, 0) + 1
        return dict(sorted(counts.items())), self._revision_of(data)

    async def revision(self) -> int:
        await self._ensure()
        if await self._caught_up():
            return self._mirror_rev
        return self._revision_of(await self._range(self._instances, count_only=True))

    async def wait(self, after: int, timeout: float, service: str | None = None) -> int:
        await self._ensure()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while self._live and self.gateway.down_since is None:
            last = self._last_change(service)
            left = deadline - loop.time()
            if last > after or left <= 0:
                return last
            await self._signal.wait(left)
        # the mirror is not in sync: ask etcd (which fails at once while it is known down)
        return await self._wait_on_etcd(after, max(deadline - loop.time(), 0.0), service)

    async def watch(self, after: int) -> AsyncGenerator[Event, None]:
        changes = self._changes(self._root, after + 1)
        try:
            async for _, raw in changes:
                for event in self._events(raw):
                    yield event
        finally:
            await changes.aclose()

    async def expire(self) -> int:
        """Delete the instances whose TTL this node holds and which had no heartbeat within
        it (guarded: one changed meanwhile, by a takeover say, is left alone)."""
        now = self.clock()
        due = [(key, own) for key, own in self._owned.items() if own.deadline <= now]
        if not due:
            return 0
        items = [(key, own.instance.revision, [self._delete_op(key)]) for key, own in due]
        done = 0
        for key, applied in await self._txn_many(items):
            own = self._owned.get(key)
            if own is not None and own.deadline <= self.clock():
                del self._owned[key]  # deleted, or changed by someone else: not ours now
            done += applied is not None
        self.expired += done
        return done

    async def close(self) -> None:
        """Stop watching and forwarding. The node's lease is left to run out, so a restart
        within ``node_ttl`` keeps this node's instances (module docstring)."""
        self._closed = True
        tasks = [*self._tasks, *self._forwarding.values()]
        if self._checking is not None:
            tasks.append(self._checking)
        if self._started is not None:
            tasks.append(self._started)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._forwarding.clear()
        self._live = False
        self._wake()
        await self._peers.close()
        await self.gateway.close()

    def statistics(self) -> dict[str, object]:
        gateway = self.gateway
        return {
            "store": self.name,
            "endpoints": list(gateway.endpoints),
            "endpoint": gateway.endpoint,
            "prefix": self.prefix,
            "node": self.node,
            "advertise": self.advertise,
            "revision": self.last_revision,
            "mirror_revision": self._mirror_rev,
            "mirror_live": self._live,
            "instances": len(self._mirror),
            "nodes": len(self._nodes),
            "owned": len(self._owned),
            "requests": gateway.requests,
            "failovers": gateway.failovers,
            "unavailable": gateway.unavailable,
            "heartbeats": self.heartbeats,
            "forwarded": self.forwarded,
            "received": self.received,
            "takeovers": self.takeovers,
            "adopted": self.adopted,
            "expired": self.expired,
            "writes": self.writes,
            "sessions": self.sessions,
            "watches": gateway.watches,
            "last_error": gateway.last_error,
            "down": gateway.down_since is not None,
        }

    def __repr__(self) -> str:
        return (
            f"EtcdStore({self.gateway.endpoint} prefix {self.prefix!r} node {self.node!r}, "
            f"revision {self.last_revision})"
        )

    # -- start: the mirror and the node's session --------------------------------------------

    async def _ensure(self) -> None:
        """List and start watching (once; again after a failed first try)."""
        if self._closed:
            raise StoreUnavailable("etcd store is closed")
        started = self._started
        if started is not None and started.done() and started.exception() is not None:
            started = None  # the first try failed (etcd down): try again
        if started is None:
            started = self._started = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(started)

    async def _start(self) -> None:
        if self._follower is None:
            rev = await self._list()
            self._follower = asyncio.get_running_loop().create_task(self._follow(rev))
            self._tasks.append(self._follower)
        stale = [key for key, e in self._mirror.items() if e.node == self.node]
        if stale:  # this node restarted: keep what it held
            await self._adopt(stale)

    async def _list(self) -> int:
        """Rebuild the mirror from one listing of the prefix; its revision."""
        data = await self._range(self._root, prefix=True)
        rev = self._revision_of(data)
        old = self._by_service
        self._mirror, self._by_service, self._nodes = {}, {}, {}
        for kv in data.get("kvs", ()):
            self._apply_put(kv)
        for service in set(old) | set(self._by_service):
            if {i: e.instance for i, e in old.get(service, {}).items()} != {
                i: e.instance for i, e in self._by_service.get(service, {}).items()
            }:
                self._service_rev[service] = rev
        self._mirror_rev = rev
        self._live = True
        self._wake()
        return rev

    async def _follow(self, rev: int) -> None:
        """Keep the mirror in sync: watch from ``rev``; list again when the watch cannot go on
        (compacted, etcd unreachable until it is back)."""
        failures = 0
        while not self._closed:
            try:
                async for _, raw in self._changes(self._root, rev + 1, self._set_live):
                    failures = 0
                    if not raw:
                        continue
                    # (not the response's header revision: a watch's first answer carries
                    # etcd's current revision before the events up to it have come)
                    self._apply(raw)
                    rev = max(rev, int(raw[-1]["kv"]["mod_revision"]))
                    self._mirror_rev = rev
                    self._wake()
            except (Compacted, RegistryError) as exc:
                if self._live:  # (the gateway logs an outage itself, once)
                    log.debug("etcd mirror out of sync (%s): listing again", exc)
                self._live = False
                self._wake()
            while not self._closed:  # list again, until etcd answers
                await asyncio.sleep(MIRROR_BACKOFF[min(failures, len(MIRROR_BACKOFF) - 1)])
                failures += 1
                try:
                    rev = await self._list()
                except RegistryError:
                    continue
                await self._check_owned()
                break

    def _set_live(self, live: bool) -> None:
        """The mirror's watch is open (True) or dropped (False: until it is open again,
        reads go to etcd, and fail at once if it is down, rather than answer from a copy
        that may be falling behind)."""
        if live != self._live:
            self._live = live
            self._wake()

    def _apply(self, raw: list[KV]) -> None:
        tombs = {
            _unb64(e["kv"]["key"])[len(self._tombstones) :]
            for e in raw
            if e.get("type", "PUT") == "PUT" and _unb64(e["kv"]["key"]).startswith(self._tombstones)
        }
        for e in raw:
            kv = e["kv"]
            if e.get("type", "PUT") == "PUT":
                self._apply_put(kv)
                continue
            key = _unb64(kv["key"])
            rev = int(kv.get("mod_revision", 0))
            if key.startswith(self._instances):
                service, _, iid = key[len(self._instances) :].partition("/")
                ikey = (service, iid)
                self._mirror.pop(ikey, None)
                found = self._by_service.get(service)
                if found is not None:
                    found.pop(iid, None)
                self._service_rev[service] = rev
                own = self._owned.get(ikey)
                if own is not None and own.instance.revision < rev:
                    if f"{service}/{iid}" in tombs:
                        del self._owned[ikey]  # deregistered (through another node)
                    else:
                        # our lease ran out (then the instance is written back) or someone
                        # deleted the key by hand (then it is gone): _check_session decides
                        self._orphans.add(ikey)
                        if self._checking is None and not self._closed:
                            loop = asyncio.get_running_loop()
                            self._checking = loop.create_task(self._check_session())
            elif key.startswith(self._nodes_prefix):
                gone = key[len(self._nodes_prefix) :]
                self._nodes.pop(gone, None)

    def _apply_put(self, kv: KV) -> None:
        key = _unb64(kv["key"])
        if key.startswith(self._instances):
            try:
                entry = self._decode(kv)
            except RegistryError as exc:
                log.warning("%s", exc)
                return
            inst = entry.instance
            self._mirror[inst.key] = entry
            self._by_service.setdefault(inst.service, {})[inst.id] = entry
            self._service_rev[inst.service] = inst.revision
            own = self._owned.get(inst.key)
            if own is not None and own.instance.revision < inst.revision:
                if entry.node == self.node and entry.lease == own.lease:
                    own.instance = inst  # a change of ours (a status set on another node)
                else:
                    del self._owned[inst.key]  # taken over, or made leaseless
        elif key.startswith(self._nodes_prefix):
            try:
                data = json.loads(_unb64(kv.get("value", "")))
                api = data.get("api")
            except (ValueError, AttributeError):
                api = None
            name = key[len(self._nodes_prefix) :]
            self._nodes[name] = _Node(
                api if isinstance(api, str) else None, int(kv.get("lease", 0))
            )

    async def _caught_up(self) -> bool:
        """Whether reads may answer from the mirror: it is in sync, and has passed this store's
        own last write (read-your-writes), waiting a little for that."""
        if not self._live or self.gateway.down_since is not None:
            return False  # known down: reads fail at once, as every call then does
        if self._mirror_rev >= self._must_see:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CATCH_UP
        while self._live and self._mirror_rev < self._must_see:
            left = deadline - loop.time()
            if left <= 0:
                return False
            await self._signal.wait(left)
        return self._live

    def _last_change(self, service: str | None) -> int:
        if service is None:
            return self._mirror_rev
        return self._service_rev.get(service, 0)

    def _wake(self) -> None:
        self._signal.wake()

    async def _lease_id(self) -> int:
        """This node's lease, taken (with its node key) on first need."""
        if self._lease:
            return self._lease
        if self._session is None:
            self._session = asyncio.Lock()
        async with self._session:
            if not self._lease:
                await self._new_session()
                loop = asyncio.get_running_loop()
                self._tasks.append(loop.create_task(self._keep_session()))
        return self._lease

    async def _new_session(self) -> None:
        data = await self.gateway.call("/v3/lease/grant", {"TTL": str(int(self.node_ttl))})
        lease = int(data["ID"])
        value = _b64(json.dumps({"node": self.node, "api": self.advertise}))
        put = {"key": _b64(f"{self._nodes_prefix}{self.node}"), "value": value,
               "lease": str(lease)}  # fmt: skip
        await self._write("/v3/kv/put", put)
        self._lease = lease
        self.sessions += 1

    async def _keep_session(self) -> None:
        """Keep the node's lease alive; when it ran out (etcd unreachable for longer than
        ``node_ttl``, or this process stopped that long), take a new one."""
        while not self._closed:
            await asyncio.sleep(self.node_ttl / 3)
            lease = self._lease
            try:
                if not await self._lease_alive(lease):
                    await self._renew_session(lease)
            except RegistryError as exc:
                log.debug("etcd session keepalive failed: %s", exc)

    async def _lease_alive(self, lease: int) -> bool:
        """Keep ``lease`` alive; False when etcd no longer has it (it ran out)."""
        data = await self.gateway.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0)) > 0

    async def _check_session(self) -> None:
        """Instances this node holds were deleted without a deregistration: if its lease ran
        out, take a new one and write them back; if not, they were deleted by hand."""
        try:
            lease = self._lease
            if lease and not await self._lease_alive(lease):
                await self._renew_session(lease)
            else:
                for key in self._orphans:
                    own = self._owned.get(key)
                    if own is not None and key not in self._mirror:
                        del self._owned[key]
        except RegistryError as exc:
            log.debug("etcd session check failed: %s", exc)
        finally:
            self._orphans.clear()
            self._checking = None

    async def _renew_session(self, old: int) -> None:
        """Lease ``old`` ran out: take a new one (once, however many notice) and write back
        the instances still held, which went with the old one."""
        assert self._session is not None
        async with self._session:
            if self._lease != old:
                return  # renewed meanwhile
            log.warning("etcd lease of node %s ran out: taking a new one and writing back "
                        "%d instance(s)", self.node, len(self._owned))  # fmt: skip
            await self._new_session()
        await self._rewrite_owned()

    async def _rewrite_owned(self) -> None:
        """After a new lease: put back every instance still held. They went with the old
        lease; one that exists all the same was written by someone else: theirs."""
        lease = self._lease
        items = [(key, None, [self._put_op(key, own.instance, lease)])
                 for key, own in self._owned.items()]  # fmt: skip
        for key, applied in await self._txn_many(items):
            held = self._owned.get(key)
            if held is None:
                continue
            if applied is not None:
                held.instance, held.lease = replace(held.instance, revision=applied), lease
                continue
            now = await self._read(key)
            if now is not None and now.node == self.node and now.lease == lease:
                held.instance, held.lease = now.instance, lease
            else:
                del self._owned[key]

    async def _adopt(self, keys: list[Key]) -> None:
        """Keys this node's earlier run held: move them to this run's lease, fresh deadlines."""
        lease = await self._lease_id()
        ours = await self._move_here(keys, lambda e: e.node == self.node and e.lease != lease)
        self.adopted += ours
        if ours:
            log.info("etcd: node %s took back %d instance(s) it held before a restart",
                     self.node, ours)  # fmt: skip

    async def _check_owned(self) -> None:
        """After the mirror was rebuilt: drop what is no longer ours."""
        for key in list(self._owned):
            seen = self._mirror.get(key)
            # gone while we were cut off (our lease ran out: _keep_session writes it back),
            # or taken over by another node
            if seen is not None and seen.node != self.node:
                del self._owned[key]

    # -- holding TTLs, forwarding, taking over -------------------------------------------------

    def _hold(self, key: Key, instance: Instance, lease: int) -> None:
        self._owned[key] = _Owned(instance, lease, self.clock() + (instance.ttl or 0.0))
        self._must_see = max(self._must_see, instance.revision)

    def _renew(self, key: Key, seen: _Entry) -> bool:
        """Renew ``seen``'s TTL where it is held, without waiting: here, or by forwarding to
        its live owner. False when that cannot be done (no owner, or a dead one: take over)."""
        ttl = seen.instance.ttl
        if ttl is None:
            return True  # nothing to renew
        own = self._owned.get(key)
        if own is not None:
            now = self.clock()
            if own.deadline <= now:
                return False
            own.deadline = now + ttl
            return True
        node = self._nodes.get(seen.node)
        if seen.node == self.node or node is None or node.api is None or node.lease != seen.lease:
            return False
        self._forward.setdefault(seen.node, set()).add(key)
        if seen.node not in self._forwarding and not self._closed:
            task = asyncio.get_running_loop().create_task(self._send_beats(seen.node))
            self._forwarding[seen.node] = task
        self.forwarded += 1
        return True

    async def _send_beats(self, node: str) -> None:
        """Send the heartbeats held for ``node`` in batches, one request at a time; take over
        the instances when it cannot be reached."""
        try:
            while not self._closed:
                pending = self._forward.pop(node, None)
                if not pending:
                    return
                keys, size = [], 0
                for key in sorted(pending):  # a request body stays under the API's limit
                    size += len(key[0]) + len(key[1]) + 8
                    if size > FORWARD_BYTES:
                        self._forward.setdefault(node, set()).add(key)  # the next request
                    else:
                        keys.append(key)
                target = self._nodes.get(node)
                try:
                    if target is None or target.api is None:
                        raise OSError(f"node {node} is gone")
                    refused = await self._post_beats(target.api, keys)
                except (OSError, WireError, TimeoutError, ValueError) as exc:
                    log.warning("heartbeats for node %s could not be forwarded (%s): taking "
                                "over %d instance(s)", node, exc, len(keys))  # fmt: skip
                    await self._take_over([k for k in keys if self._owner(k) == node])
                    continue
                if refused:
                    # lapsed there (forwarded too late), or no longer its (then our mirror is
                    # behind, and the guard of the takeover fails): keep the instance
                    await self._take_over([k for k in refused if self._owner(k) == node])
        except RegistryError as exc:
            log.warning("taking over the instances of node %s failed: %s", node, exc)
        finally:
            self._forwarding.pop(node, None)
            if self._forward.get(node) and not self._closed:  # queued as this one ended
                loop = asyncio.get_running_loop()
                self._forwarding[node] = loop.create_task(self._send_beats(node))

    async def _post_beats(self, api: str, keys: list[Key]) -> list[Key]:
        headers = {} if self.token is None else {"Authorization": f"Bearer {self.token}"}
        body = {"from": self.node, "beats": [list(k) for k in keys]}
        async with asyncio.timeout(FORWARD_TIMEOUT):
            response = await self._peers.post(api, "/v1/internal/heartbeats", body, headers=headers)
        data = response.json()
        if response.status != 200 or not isinstance(data, dict):
            raise ValueError(f"HTTP {response.status}: {response.body[:200]!r}")
        return [(str(s), str(i)) for s, i in data.get("refused", [])]

    async def _know_node(self, name: str) -> None:
        """Make sure the mirror knows node ``name`` when etcd does (the mirror may not have
        seen its key yet: a node writes it before any instance on its lease)."""
        if name and name != self.node and name not in self._nodes:
            kvs = (await self._range(f"{self._nodes_prefix}{name}")).get("kvs", ())
            if kvs:
                self._apply_put(kvs[0])

    def _owner(self, key: Key) -> str | None:
        seen = self._mirror.get(key)
        return None if seen is None else seen.node

    async def _take_over(self, keys: list[Key]) -> None:
        """Instances of a node that cannot be reached: hold them here."""
        self.takeovers += await self._move_here(keys, lambda e: e.node != self.node)

    async def _move_here(self, keys: list[Key], which: Callable[[_Entry], bool]) -> int:
        """Move the keys the mirror shows as ``which`` to this node's lease (guarded by their
        revision: one changed meanwhile stays as it is); how many moved."""
        lease = await self._lease_id()
        items = []
        for key in keys:
            seen = self._mirror.get(key)
            if seen is not None and which(seen):
                items.append(
                    (key, seen.instance.revision, [self._put_op(key, seen.instance, lease)])
                )
        moved = 0
        for key, applied in await self._txn_many(items):
            seen = self._mirror.get(key)
            if applied is not None and seen is not None:
                self._hold(key, replace(seen.instance, revision=applied), lease)
                moved += 1
        return moved

    async def _claim(self, key: Key) -> Instance:
        """A heartbeat ``beat()`` could not decide: read the key; renew it where it is held,
        or take it over when its owner is gone. ``NotRegistered`` when there is none."""
        own = self._owned.get(key)
        if own is not None and own.deadline <= self.clock():
            raise NotRegistered(*key)  # lapsed: expire() deletes it
        for _ in range(RETRIES):
            seen = await self._read(key)
            if seen is None:
                self._owned.pop(key, None)
                raise NotRegistered(*key)
            await self._know_node(seen.node)
            if self._renew(key, seen):
                return seen.instance
            lease = await self._lease_id()
            if seen.node == self.node and seen.lease == lease:
                self._hold(key, seen.instance, lease)  # ours all along (mirror behind)
                return seen.instance
            applied, _ = await self._txn(
                key, seen.instance.revision, [self._put_op(key, seen.instance, lease)]
            )
            if applied:
                stored = replace(seen.instance, revision=applied)
                self._hold(key, stored, lease)
                self.takeovers += 1
                return stored
        raise StoreUnavailable(f"etcd: {self._path(key)} changed {RETRIES} times")

    def _known(self, key: Key) -> _Entry | None:
        """What this node believes the key holds (its own record first, then the mirror)."""
        own = self._owned.get(key)
        if own is not None:
            return _Entry(own.instance, self.node, own.lease)
        return self._mirror.get(key)

    # -- keys and values -------------------------------------------------------------------

    def _path(self, key: Key) -> str:
        return f"{self._instances}{key[0]}/{key[1]}"

    def _decode(self, kv: KV) -> _Entry:
        key = _unb64(kv["key"])
        try:
            data = json.loads(_unb64(kv.get("value", "")))
            inst = replace(Instance.from_json(data), revision=int(kv["mod_revision"]))
            node = str(data.get("node") or "")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"etcd: {key} does not hold an instance: {exc}") from exc
        return _Entry(inst, node, int(kv.get("lease", 0)))

    def _events(self, raw: list[KV]) -> Iterable[Event]:
        """Watch events (one response: whole revisions) -> registry events."""
        tombs = {
            (_unb64(e["kv"]["key"])[len(self._tombstones) :], e["kv"].get("mod_revision"))
            for e in raw
            if e.get("type", "PUT") == "PUT" and _unb64(e["kv"]["key"]).startswith(self._tombstones)
        }
        for e in raw:
            kv = e["kv"]
            key = _unb64(kv["key"])
            if not key.startswith(self._instances):
                continue
            service, _, iid = key[len(self._instances) :].partition("/")
            rev = int(kv.get("mod_revision", 0))
            if e.get("type", "PUT") == "PUT":
                yield Event(rev, PUT, service, iid, self._decode(kv).instance)
            else:
                gone = (f"{service}/{iid}", kv.get("mod_revision")) in tombs
                yield Event(rev, DELETE, service, iid, reason="deregistered" if gone else "expired")

    def _put_op(self, key: Key, instance: Instance, lease: int) -> KV:
        """Put ``instance``: on this node's ``lease``, naming this node, or (0) on none."""
        data = replace(instance, revision=0).to_json()
        data["node"] = self.node if lease else ""
        put: KV = {"key": _b64(self._path(key)), "value": _b64(json.dumps(data, sort_keys=True))}
        if lease:
            put["lease"] = str(lease)
        return {"request_put": put}

    def _delete_op(self, key: Key) -> KV:
        return {"request_delete_range": {"key": _b64(self._path(key))}}

    def _revision_of(self, data: KV) -> int:
        rev = int(data.get("header", {}).get("revision", 0))
        self.last_revision = max(self.last_revision, rev)
        return rev

    # -- etcd operations -------------------------------------------------------------------

    async def _range(
        self, key: str, *, prefix: bool = False, keys_only: bool = False, count_only: bool = False
    ) -> KV:
        body: KV = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(_range_end(key))
        if keys_only:
            body["keys_only"] = True
        if count_only:
            body["count_only"] = True
        return await self.gateway.call("/v3/kv/range", body)

    async def _write(self, path: str, body: KV) -> None:
        """An unguarded write (a node key, a tombstone's removal): this store's reads wait
        for the mirror to pass it, as for every write of its own."""
        data = await self.gateway.call(path, body)
        self._must_see = max(self._must_see, self._revision_of(data))

    async def _read(self, key: Key) -> _Entry | None:
        kvs = (await self._range(self._path(key))).get("kvs", ())
        if not kvs:
            return None
        entry = self._decode(kvs[0])
        # acted on from here (an answer lost, our own write found): our reads include it
        self._must_see = max(self._must_see, entry.instance.revision)
        return entry

    async def _txn(self, key: Key, mod: int | None, ops: list[KV]) -> tuple[int, _Entry | None]:
        """Apply ``ops`` if the key's ``mod_revision`` is still ``mod`` (None: absent).
        Returns (the new revision, None), or (0, what the key holds now) when someone changed
        it first: one round trip either way."""
        path = _b64(self._path(key))
        body = {"compare": [_guard(path, mod)], "success": ops,
                "failure": [{"request_range": {"key": path}}]}  # fmt: skip
        data = await self._call_txn(body)
        rev = self._revision_of(data)
        if data.get("succeeded"):
            self.writes += 1
            self._must_see = max(self._must_see, rev)
            return rev, None
        responses = data.get("responses") or [{}]
        kvs = responses[0].get("response_range", {}).get("kvs", ())
        return 0, (self._decode(kvs[0]) if kvs else None)

    async def _txn_many(
        self, items: Sequence[tuple[Key, int | None, list[KV]]]
    ) -> list[tuple[Key, int | None]]:
        """Several guarded single-key writes, ``BATCH`` to a transaction; a batch whose guard
        fails is done key by key. Returns (key, the revision applied at, or None)."""
        out: list[tuple[Key, int | None]] = []
        for start in range(0, len(items), BATCH):
            chunk = items[start : start + BATCH]
            if len(chunk) > 1:
                compares = [_guard(_b64(self._path(key)), mod) for key, mod, _ in chunk]
                ops = [op for _, _, key_ops in chunk for op in key_ops]
                data = await self._call_txn({"compare": compares, "success": ops})
                rev = self._revision_of(data)
                if data.get("succeeded"):
                    self.writes += 1
                    self._must_see = max(self._must_see, rev)
                    out.extend((key, rev) for key, _, _ in chunk)
                    continue
            for key, mod, key_ops in chunk:
                applied, _ = await self._txn(key, mod, key_ops)
                out.append((key, applied or None))
        return out

    async def _call_txn(self, body: KV) -> KV:
        """A transaction; when it fails because this node's lease ran out (etcd was out of
        reach for longer than ``node_ttl``), take a new lease and send it again on that."""
        try:
            return await self.gateway.call("/v3/kv/txn", body, raw_errors=True)
        except EtcdError as exc:
            old = self._lease
            if exc.code != NOT_FOUND or not old:
                raise translate(exc) from exc
        await self._renew_session(old)
        for op in body["success"]:
            put = op.get("request_put")
            if put is not None and put.get("lease") == str(old):
                put["lease"] = str(self._lease)
        try:
            return await self.gateway.call("/v3/kv/txn", body, raw_errors=True)
        except EtcdError as exc:
            raise translate(exc) from exc

    async def _changes(
        self, key: str, start: int, live: Callable[[bool], None] | None = None
    ) -> AsyncGenerator[tuple[int, list[KV]], None]:
        """Watch ``key``'s range (``key`` is a prefix ending in '/') from revision ``start``:
        yields (header revision, raw events) per response, forever; reopens a dropped stream
        after the last yielded revision; ``Compacted`` when ``start`` is no longer kept.
        ``live(False)`` is called when a stream drops, ``live(True)`` when one is open."""
        create = {"key": _b64(key), "range_end": _b64(_range_end(key))}
        delay = 0.05
        while True:
            body = {"create_request": {**create, "start_revision": str(start)}}
            async with contextlib.aclosing(self.gateway.stream(body)) as results:
                try:
                    async for result in results:
                        if live is not None:
                            live(True)
                        if int(result.get("compact_revision", 0)):
                            compacted = int(result["compact_revision"])
                            raise Compacted(start - 1, compacted - 1)
                        if result.get("canceled"):
                            reason = result.get("cancel_reason", "no reason given")
                            raise RegistryError(f"etcd cancelled a watch: {reason}")
                        events = result.get("events", [])
                        header = self._revision_of(result)
                        if events:
                            start = int(events[-1]["kv"]["mod_revision"]) + 1
                        delay = 0.05
                        yield max(header, start - 1), events
                except ValueError:
                    pass  # a broken answer: reopen below
            if live is not None:
                live(False)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _wait_on_etcd(self, after: int, timeout: float, service: str | None) -> int:
        """A blocking wait answered by an etcd watch (while the mirror is not in sync)."""
        if service is None:
            current = self._revision_of(await self._range(self._instances, count_only=True))
            if current > after:
                return current
            start = self._instances
        else:
            start = f"{self._instances}{service}/"
        latest = after
        changes = self._changes(start, after + 1)
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                async for header, events in changes:
                    latest = header
                    if events:
                        last = max(int(e["kv"].get("mod_revision", 0)) for e in events)
                        self._must_see = max(self._must_see, last)  # a listing includes it
                        return last
        except TimeoutError:
            pass
        except Compacted:
            return self._revision_of(await self._range(self._instances, count_only=True))
        finally:
            await changes.aclose()
        return min(after, latest)
