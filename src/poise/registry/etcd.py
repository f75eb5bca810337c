"""``EtcdStore``: the registry kept in etcd v3, spoken to through etcd's JSON gateway over HTTP
(``EtcdGateway`` in ``poise.registry.etcdhttp``: members, requests, failover).

Theory of operation
-------------------
**Keys.** An instance is the key ``{prefix}/instances/{service}/{id}`` holding
``Instance.to_json()`` (its ``revision`` field written as 0: the real one is the key's
``mod_revision``). A deregistration also writes ``{prefix}/deregistered/{service}/{id}`` in the
same transaction that deletes the instance (see *Expiry*). Nothing else is written.

**Revisions** are etcd's own: an instance's revision is its key's ``mod_revision``, the store's
revision is the revision in etcd's response header. They only grow and are the same for every
poise on that etcd, which is what lets two poise instances agree on "where they are". Writes to
other keys of the same etcd also move the revision: ``revision()`` and unscoped ``wait()`` then
return a larger number with the same data (harmless; per-service waits only wake on changes to
that service, since they watch its key range).

**TTL = one lease per instance.** An instance with a TTL is put with its own lease (TTL rounded
up to whole seconds, at least 2: etcd's minimum on default settings). A heartbeat reads the key
and keeps its lease alive (two round trips, no write, no revision); a missing key or an unknown
lease means the instance is gone (``NotRegistered``). etcd deletes the key
when the lease runs out, so ``expire()`` does nothing. A re-registration with another TTL gets a
new lease and revokes the old one after the key has moved to the new one.

**Expiry vs deregistration.** Both reach watchers as a DELETE of the instance key. Deregister
deletes it in a transaction that also puts the tombstone key, so both events carry the same
revision and arrive in the same watch response (etcd never splits a revision across
responses). A DELETE with a tombstone beside it is ``deregistered``; one without is
``expired`` (lease expiry, or someone deleting the key by hand). The tombstone is put on the
instance's lease and that lease revoked right after, which deletes the tombstone; an instance
without a lease has its tombstone deleted explicitly. Watchers ignore tombstone deletes. If poise
dies between the two steps a tombstone outlives it (until its lease expires, or for leaseless
instances until the next deregistration of that id overwrites it): harmless, never listed.

**No change, no revision.** Every write is a transaction guarded by the ``mod_revision`` read
just before (or "absent"), so a concurrent writer makes it fail and we read and decide again:
an identical re-registration is recognised against what is really stored and only renews the
lease, also under concurrency and after a retried request that had in fact been applied.

**Watch and wait.** ``watch(after)`` is an etcd watch on ``{prefix}/`` from ``after + 1``;
``wait()`` watches the service's (or all instances') key range the same way until the first
event or its timeout. A dropped stream is reopened from the revision after the last delivered
one, so nothing is lost or repeated. A compacted start revision raises ``Compacted``. Each
``watch()`` and ``wait()`` holds one etcd watch (one HTTP connection) while it runs: a server
should keep one ``watch()`` per process and answer blocking queries from what it has seen.

**Endpoints and failures** are the gateway's (``poise.registry.etcdhttp``): a call goes to
the next member when one fails and is retried until ``timeout``; then ``StoreUnavailable``,
and the store is *known down* (calls fail at once) until a background probe reaches a member
again. Retrying a write is safe: the transaction's guard fails if the first try had in fact
been applied, and we decide again from what is stored (a lease granted by a lost answer just
expires).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import replace

from poise.errors import Compacted, NotRegistered, RegistryError, StoreUnavailable
from poise.registry.etcdhttp import KV, NOT_FOUND, EtcdError, EtcdGateway, translate
from poise.registry.model import DELETE, PUT, Event, Instance, check_status

__all__ = ["EtcdStore"]

MIN_LEASE = 2  # seconds: etcd's minimum lease TTL with its default election timeout
RETRIES = 20  # read-decide-write rounds lost to concurrent writers before giving up


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _range_end(prefix: str) -> str:
    """The first key after every key starting with ``prefix`` (prefixes here end in '/')."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def lease_ttl(ttl: float) -> int:
    return max(MIN_LEASE, math.ceil(ttl))


class EtcdStore:
    name = "etcd"

    def __init__(
        self,
        endpoints: str | Sequence[str] = "http://127.0.0.1:2379",
        *,
        prefix: str = "/poise",
        timeout: float = 5.0,
        attempt_timeout: float = 2.0,
    ) -> None:
        eps = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not eps:
            raise ValueError("EtcdStore needs at least one endpoint")
        self.prefix = prefix.rstrip("/")
        self._instances = f"{self.prefix}/instances/"
        self._tombstones = f"{self.prefix}/deregistered/"
        probe = {"key": _b64(self._instances), "range_end": _b64(_range_end(self._instances)),
                 "count_only": True}  # fmt: skip
        self.gateway = EtcdGateway(
            eps, timeout=timeout, attempt_timeout=attempt_timeout, probe=probe
        )
        self.last_revision = 0
        self.heartbeats = 0
        self.leases = 0

    # -- the Store protocol ----------------------------------------------------------------

    async def register(self, instance: Instance) -> Instance:
        key = self._key(self._instances, instance.service, instance.id)
        value = _b64(json.dumps(replace(instance, revision=0).to_json(), sort_keys=True))
        for _ in range(RETRIES):
            kv = await self._get(key)
            old = None if kv is None else self._decode(kv)
            old_lease = 0 if kv is None else int(kv.get("lease", 0))
            reuse = (
                old is not None
                and old.ttl == instance.ttl
                and (old.ttl is None or await self._keepalive(old_lease))
            )
            if reuse and old is not None and old.same_registration(instance):
                return old  # identical: the keepalive above renewed the TTL
            lease = old_lease if reuse else await self._grant(instance.ttl)
            try:
                rev = await self._txn(key, kv, [self._put(key, value, lease)])
            except EtcdError as exc:
                if exc.code != NOT_FOUND:  # the lease ran out meanwhile: decide again
                    raise translate(exc) from exc
                rev = None
            if rev is not None:
                if old_lease and old_lease != lease:
                    await self._revoke(old_lease)  # the key has moved to the new lease
                return replace(instance, revision=rev)
            if lease and lease != old_lease:
                # the key changed under us; if it now holds our new lease, the change was
                # ours (an answer lost, the request retried): revoking would delete it
                now = await self._get(key)
                if now is not None and int(now.get("lease", 0)) == lease:
                    if old_lease:
                        await self._revoke(old_lease)
                    return self._decode(now)
                await self._revoke(lease)
        raise StoreUnavailable(f"etcd: {key} changed {RETRIES} times while registering")

    async def heartbeat(
        self, service: str, instance_id: str, status: str | None = None
    ) -> Instance:
        key = self._key(self._instances, service, instance_id)
        self.heartbeats += 1
        for _ in range(RETRIES):
            kv = await self._get(key)
            if kv is None:
                raise NotRegistered(service, instance_id)
            old = self._decode(kv)
            lease = int(kv.get("lease", 0))
            if old.ttl is not None and not await self._keepalive(lease):
                raise NotRegistered(service, instance_id)
            if status is None or status == old.status:
                return old
            new = replace(old, status=check_status(status), revision=0)
            value = _b64(json.dumps(new.to_json(), sort_keys=True))
            try:
                rev = await self._txn(key, kv, [self._put(key, value, lease)])
            except EtcdError as exc:
                if exc.code == NOT_FOUND:
                    raise NotRegistered(service, instance_id) from exc
                raise translate(exc) from exc
            if rev is not None:
                return replace(new, revision=rev)
        raise StoreUnavailable(f"etcd: {key} changed {RETRIES} times during a heartbeat")

    async def deregister(self, service: str, instance_id: str) -> bool:
        key = self._key(self._instances, service, instance_id)
        tomb = self._key(self._tombstones, service, instance_id)
        for _ in range(RETRIES):
            kv = await self._get(key)
            if kv is None:
                return False
            lease = int(kv.get("lease", 0))
            ops = [self._put(tomb, _b64("deregistered"), lease), self._delete(key)]
            try:
                rev = await self._txn(key, kv, ops)
            except EtcdError as exc:
                if exc.code != NOT_FOUND:
                    raise translate(exc) from exc
                continue  # the lease expired meanwhile, and the key with it
            if rev is None:
                # changed under us; a tombstone newer than what we read means the instance
                # was deregistered meanwhile, maybe by our own retried request: finish it
                tomb_kv = await self._get(tomb)
                if tomb_kv is None or int(tomb_kv["mod_revision"]) <= int(kv["mod_revision"]):
                    continue
                if await self._get(key) is not None:
                    continue
            if lease:
                await self._revoke(lease)  # deletes the tombstone with it
            else:
                await self.gateway.call("/v3/kv/deleterange", {"key": _b64(tomb)})
            return True
        raise StoreUnavailable(f"etcd: {key} changed {RETRIES} times while deregistering")

    async def instances(self, service: str) -> tuple[tuple[Instance, ...], int]:
        data = await self._range(self._key(self._instances, service, ""), prefix=True)
        found = sorted((self._decode(kv) for kv in data.get("kvs", ())), key=lambda i: i.id)
        return tuple(found), self._revision_of(data)

    async def services(self) -> tuple[dict[str, int], int]:
        data = await self._range(self._instances, prefix=True, keys_only=True)
        counts: dict[str, int] = {}
        for kv in data.get("kvs", ()):
            service = _unb64(kv["key"])[len(self._instances) :].split("/", 1)[0]
            counts[service] = counts.get(service, 0) + 1
        return dict(sorted(counts.items())), self._revision_of(data)

    async def revision(self) -> int:
        return self._revision_of(await self._range(self._instances, count_only=True))

    async def wait(self, after: int, timeout: float, service: str | None = None) -> int:
        if service is None:
            current = await self.revision()
            if current > after:
                return current
            start = self._instances
        else:
            start = self._key(self._instances, service, "")
        latest = after
        changes = self._changes(start, after + 1)
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                async for header, events in changes:
                    latest = header
                    if events:
                        return max(int(e["kv"].get("mod_revision", 0)) for e in events)
        except TimeoutError:
            pass
        except Compacted:
            return await self.revision()  # history is gone: something changed, list again
        finally:
            await changes.aclose()
        return min(after, latest)

    async def watch(self, after: int) -> AsyncGenerator[Event, None]:
        changes = self._changes(f"{self.prefix}/", after + 1)
        try:
            async for _, raw in changes:
                for event in self._events(raw):
                    yield event
        finally:
            await changes.aclose()

    async def expire(self) -> int:
        return 0  # etcd deletes an instance's key when its lease runs out

    async def close(self) -> None:
        await self.gateway.close()

    def statistics(self) -> dict[str, object]:
        gateway = self.gateway
        return {
            "store": self.name,
            "endpoints": list(gateway.endpoints),
            "endpoint": gateway.endpoint,
            "prefix": self.prefix,
            "revision": self.last_revision,
            "requests": gateway.requests,
            "failovers": gateway.failovers,
            "unavailable": gateway.unavailable,
            "heartbeats": self.heartbeats,
            "leases": self.leases,
            "watches": gateway.watches,
            "last_error": gateway.last_error,
            "down": gateway.down_since is not None,
        }

    def __repr__(self) -> str:
        return (
            f"EtcdStore({self.gateway.endpoint} prefix {self.prefix!r}, "
            f"revision {self.last_revision})"
        )

    # -- keys and values -------------------------------------------------------------------

    @staticmethod
    def _key(base: str, service: str, instance_id: str) -> str:
        return f"{base}{service}/{instance_id}"

    def _decode(self, kv: KV) -> Instance:
        key = _unb64(kv["key"])
        try:
            data = json.loads(_unb64(kv.get("value", "")))
            return replace(Instance.from_json(data), revision=int(kv["mod_revision"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"etcd: {key} does not hold an instance: {exc}") from exc

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
                yield Event(rev, PUT, service, iid, self._decode(kv))
            else:
                gone = (f"{service}/{iid}", kv.get("mod_revision")) in tombs
                yield Event(rev, DELETE, service, iid, reason="deregistered" if gone else "expired")

    @staticmethod
    def _put(key: str, value: str, lease: int) -> KV:
        put: KV = {"key": _b64(key), "value": value}
        if lease:
            put["lease"] = str(lease)
        return {"request_put": put}

    @staticmethod
    def _delete(key: str) -> KV:
        return {"request_delete_range": {"key": _b64(key)}}

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

    async def _get(self, key: str) -> KV | None:
        kvs = (await self._range(key)).get("kvs", ())
        return dict(kvs[0]) if kvs else None

    async def _txn(self, key: str, seen: KV | None, ops: list[KV]) -> int | None:
        """Apply ``ops`` if ``key`` is still as ``seen`` (None: absent); the new revision, or
        None when someone changed it first."""
        if seen is None:
            compare = {"target": "CREATE", "create_revision": "0"}
        else:
            compare = {"target": "MOD", "mod_revision": str(seen["mod_revision"])}
        body = {"compare": [{"key": _b64(key), "result": "EQUAL", **compare}], "success": ops}
        data = await self.gateway.call("/v3/kv/txn", body, raw_errors=True)
        rev = self._revision_of(data)
        return rev if data.get("succeeded") else None

    async def _grant(self, ttl: float | None) -> int:
        if ttl is None:
            return 0
        data = await self.gateway.call("/v3/lease/grant", {"TTL": str(lease_ttl(ttl))})
        self.leases += 1
        return int(data["ID"])

    async def _keepalive(self, lease: int) -> bool:
        if not lease:
            return False
        data = await self.gateway.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0)) > 0

    async def _revoke(self, lease: int) -> None:
        try:
            await self.gateway.call("/v3/lease/revoke", {"ID": str(lease)}, raw_errors=True)
        except EtcdError as exc:
            if exc.code != NOT_FOUND:  # already gone is what we wanted
                raise translate(exc) from exc

    async def _changes(self, key: str, start: int) -> AsyncGenerator[tuple[int, list[KV]], None]:
        """Watch ``key``'s range (``key`` is a prefix ending in '/') from revision ``start``:
        yields (header revision, raw events) per response, forever; reopens a dropped stream
        after the last yielded revision; ``Compacted`` when ``start`` is no longer kept."""
        create = {"key": _b64(key), "range_end": _b64(_range_end(key))}
        delay = 0.05
        while True:
            body = {"create_request": {**create, "start_revision": str(start)}}
            async with contextlib.aclosing(self.gateway.stream(body)) as results:
                try:
                    async for result in results:
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
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
