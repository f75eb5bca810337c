"""``EtcdStore``: the registry kept in etcd v3, spoken to through etcd's JSON gateway over HTTP.

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

**Endpoints and failures.** Requests go to the current endpoint; a connection failure, no
answer within ``attempt_timeout`` or an "unavailable" answer (no leader, leader changed) moves
to the next one and, after a full round, retries with backoff until ``timeout`` seconds have
passed; then ``StoreUnavailable``, and the store is *known down*: from then on calls fail at
once (a registry call answers 503 at once, not after ``timeout``) while a background probe
tries the members with a cheap read every ``PROBE_BACKOFF`` seconds at most; the first answer
ends it, and calls go through again. Retrying a write is safe: the transaction's guard fails
if the first try had in fact been applied, and we decide again from what is stored (a lease
granted by a lost answer just expires). Requests carry etcd's "require leader" flag, so a
member without a leader says so at once, and a watch on a member cut off from the others is
ended by etcd.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from poise.errors import Compacted, NotRegistered, RegistryError, StoreUnavailable
from poise.registry.model import DELETE, PUT, Event, Instance, check_status

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "EtcdStore talks to etcd over HTTP with httpx: pip install 'poise[etcd]'"
    ) from exc

__all__ = ["EtcdStore"]

log = logging.getLogger("poise.registry.etcd")

MIN_LEASE = 2  # seconds: etcd's minimum lease TTL with its default election timeout
CONNECTIONS = 64  # to etcd, for unary calls (watches have their own)
RETRIES = 20  # read-decide-write rounds lost to concurrent writers before giving up
PROBE_BACKOFF = 0.5  # seconds at most between tries of the background probe while etcd is down
_RETRY_CODES = {4, 14}  # gRPC DeadlineExceeded, Unavailable: another member may answer
_NOT_FOUND = 5
KV = dict[str, Any]
# every request asks for a member with a leader: one without answers "no leader" at once
# (instead of holding a write for etcd's 7 s request timeout), and a watch on a member cut off
# from the rest of the cluster is ended rather than left silent
_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}
T = TypeVar("T")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _range_end(prefix: str) -> str:
    """The first key after every key starting with ``prefix`` (prefixes here end in '/')."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def lease_ttl(ttl: float) -> int:
    return max(MIN_LEASE, math.ceil(ttl))


class _Retry(Exception):
    """This member could not answer (unreachable, no leader, overloaded): try another."""


class _EtcdError(Exception):
    """etcd answered with an error that retrying elsewhere will not fix."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"etcd error {code}: {message}")
        self.code = code
        self.message = message


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
        self.endpoints = [e.rstrip("/") for e in eps]
        self.prefix = prefix.rstrip("/")
        self.timeout = timeout
        self.attempt_timeout = min(attempt_timeout, timeout)
        self._instances = f"{self.prefix}/instances/"
        self._tombstones = f"{self.prefix}/deregistered/"
        self._clients: dict[bool, httpx.AsyncClient] = {}  # by "for watch streams"
        # loading the CA bundle costs 50-180 ms per client: only when TLS is used, and once
        self._tls: ssl.SSLContext | None = None
        self._uses_tls = any(e.startswith("https:") for e in self.endpoints)
        self._current = 0
        self._closed = False
        self.last_revision = 0
        self.requests = 0
        self.failovers = 0
        self.unavailable = 0
        self.heartbeats = 0
        self.leases = 0
        self.watches = 0  # streams open now
        self.last_error = ""  # the last failure seen (of a member, a stream), for operators
        self._failing = False  # since the last answer: failures are logged once, not per call
        # set when a call gave up (no member answered for ``timeout``): until the background
        # probe reaches a member again, calls fail at once instead of each waiting ``timeout``
        self.down_since: float | None = None
        self._probe: asyncio.Task[None] | None = None

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
            except _EtcdError as exc:
                if exc.code != _NOT_FOUND:  # the lease ran out meanwhile: decide again
                    raise self._translate(exc) from exc
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
            except _EtcdError as exc:
                if exc.code == _NOT_FOUND:
                    raise NotRegistered(service, instance_id) from exc
                raise self._translate(exc) from exc
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
            except _EtcdError as exc:
                if exc.code != _NOT_FOUND:
                    raise self._translate(exc) from exc
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
                await self._call("/v3/kv/deleterange", {"key": _b64(tomb)})
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
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()

    def statistics(self) -> dict[str, object]:
        return {
            "store": self.name,
            "endpoints": list(self.endpoints),
            "endpoint": self.endpoints[self._current],
            "prefix": self.prefix,
            "revision": self.last_revision,
            "requests": self.requests,
            "failovers": self.failovers,
            "unavailable": self.unavailable,
            "heartbeats": self.heartbeats,
            "leases": self.leases,
            "watches": self.watches,
            "last_error": self.last_error,
            "down": self.down_since is not None,
        }

    def __repr__(self) -> str:
        return (
            f"EtcdStore({self.endpoints[self._current]} prefix {self.prefix!r}, "
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
        return await self._call("/v3/kv/range", body)

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
        data = await self._call("/v3/kv/txn", body, raw_errors=True)
        rev = self._revision_of(data)
        return rev if data.get("succeeded") else None

    async def _grant(self, ttl: float | None) -> int:
        if ttl is None:
            return 0
        data = await self._call("/v3/lease/grant", {"TTL": str(lease_ttl(ttl))})
        self.leases += 1
        return int(data["ID"])

    async def _keepalive(self, lease: int) -> bool:
        if not lease:
            return False
        data = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0)) > 0

    async def _revoke(self, lease: int) -> None:
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)}, raw_errors=True)
        except _EtcdError as exc:
            if exc.code != _NOT_FOUND:  # already gone is what we wanted
                raise self._translate(exc) from exc

    @staticmethod
    def _translate(exc: _EtcdError) -> RegistryError:
        return RegistryError(f"etcd refused a request: {exc.message} (code {exc.code})")

    def _http(self, streams: bool = False) -> httpx.AsyncClient:
        """Unary calls share a bounded keep-alive pool (a burst of heartbeats queues rather
        than opening thousands of sockets); every watch holds a connection of its own."""
        if self._closed:
            raise StoreUnavailable("etcd store is closed")
        client = self._clients.get(streams)
        if client is None:
            if streams:
                limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
            else:
                limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=None)
            if self._uses_tls and self._tls is None:
                self._tls = ssl.create_default_context()
            verify: ssl.SSLContext | bool = self._tls or False  # False: plain http, no TLS
            client = self._clients[streams] = httpx.AsyncClient(limits=limits, verify=verify)
        return client

    async def _failover(self, attempt: Callable[[str, float], Awaitable[T]]) -> T:
        """Run ``attempt(endpoint, seconds left)`` on the current member; on ``_Retry`` move
        to the next one, and after a full round wait a little (backoff), until ``timeout``."""
        if self.down_since is not None:
            raise self._unavailable()
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while True:
            if self.down_since is not None:  # another call gave up meanwhile
                raise self._unavailable()
            for _ in self.endpoints:
                endpoint = self.endpoints[self._current]
                self.requests += 1
                try:
                    left = min(deadline - time.monotonic(), self.attempt_timeout)
                    answer = await attempt(endpoint, max(left, 0.1))
                except _Retry as exc:
                    self.last_error = f"{endpoint}: {exc}"
                    if not self._failing:
                        self._failing = True
                        log.warning("etcd member %s failed (%s); trying the others",
                                    endpoint, exc)  # fmt: skip
                else:
                    if self._failing:
                        self._failing = False
                        log.info("etcd member %s answers again", endpoint)
                    return answer
                self._current = (self._current + 1) % len(self.endpoints)
                self.failovers += 1
            left = deadline - time.monotonic()
            if left <= 0:
                self.unavailable += 1
                error = StoreUnavailable(
                    f"etcd at {', '.join(self.endpoints)} unavailable for {self.timeout:g}s "
                    f"(last: {self.last_error})"
                )
                if self.down_since is None and not self._closed:
                    self.down_since = time.monotonic()
                    self._probe = asyncio.get_running_loop().create_task(
                        self._probe_until_up(), name="etcd probe"
                    )
                raise error
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.5)

    def _unavailable(self) -> StoreUnavailable:
        self.unavailable += 1
        assert self.down_since is not None
        down = time.monotonic() - self.down_since
        return StoreUnavailable(
            f"etcd at {', '.join(self.endpoints)} unavailable (down for {down:.1f}s; retrying "
            f"in the background; last: {self.last_error})"
        )

    async def _probe_until_up(self) -> None:
        """While the store is down: try each member in turn with a cheap read, with a capped
        backoff (``PROBE_BACKOFF``), until one answers; then calls go through again."""
        body = {"key": _b64(self._instances), "range_end": _b64(_range_end(self._instances)),
                "count_only": True}  # fmt: skip
        delay = 0.05
        while not self._closed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, PROBE_BACKOFF)
            for _ in self.endpoints:
                endpoint = self.endpoints[self._current]
                try:
                    await self._attempt(endpoint, "/v3/kv/range", body, self.attempt_timeout)
                except (_Retry, _EtcdError, RegistryError) as exc:
                    self.last_error = f"{endpoint}: {exc}"
                    self._current = (self._current + 1) % len(self.endpoints)
                    continue
                self.down_since, self._probe, self._failing = None, None, False
                log.info("etcd member %s answers again", endpoint)
                return

    @staticmethod
    def _error_of(status: int, data: object) -> tuple[_EtcdError, bool]:
        """An error answer -> (the error, whether another member or a retry may do better).
        Unary calls answer {"code", "message"} with an HTTP error status; streams (keepalive,
        watch) answer 200 and {"error": {"grpc_code", "http_code", "message"}}."""
        if not isinstance(data, dict):
            return _EtcdError(-1, f"HTTP {status} with no etcd answer"), True
        err = data.get("error")
        try:
            if isinstance(err, dict):
                code, http = int(err.get("grpc_code", -1)), int(err.get("http_code", status))
                message = str(err.get("message"))
            else:
                code, http, message = int(data.get("code", -1)), status, str(data.get("message"))
        except (TypeError, ValueError):
            return _EtcdError(-1, f"HTTP {status}: {str(data)[:200]}"), True
        return _EtcdError(code, message), code in _RETRY_CODES or http >= 500

    async def _call(self, path: str, body: KV, *, raw_errors: bool = False) -> KV:
        """One unary request; the answer's JSON. etcd's refusals raise ``_EtcdError`` with
        ``raw_errors`` (for callers that expect some), else ``RegistryError``."""

        async def attempt(endpoint: str, left: float) -> KV:
            return await self._attempt(endpoint, path, body, left, raw_errors=raw_errors)

        return await self._failover(attempt)

    async def _attempt(
        self, endpoint: str, path: str, body: KV, left: float, *, raw_errors: bool = False
    ) -> KV:
        """One unary request to one member (``_Retry`` when another may do better)."""
        try:
            response = await self._http().post(
                endpoint + path, json=body, timeout=left, headers=_REQUIRE_LEADER
            )
        except httpx.TransportError as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code == 200 and isinstance(data, dict) and "error" not in data:
            return data
        error, retry = self._error_of(response.status_code, data)
        if retry:
            raise _Retry(error.message)
        if raw_errors:
            raise error
        raise self._translate(error) from error

    async def _open_watch(self, body: KV) -> httpx.Response:
        async def attempt(endpoint: str, left: float) -> httpx.Response:
            client = self._http(streams=True)
            timeout = httpx.Timeout(left, read=None)  # a quiet watch is not a dead one
            request = client.build_request(
                "POST", endpoint + "/v3/watch", json=body, timeout=timeout, headers=_REQUIRE_LEADER
            )
            try:
                response = await client.send(request, stream=True)
                if response.status_code == 200:
                    return response
                try:
                    data = json.loads(await response.aread())
                except ValueError:
                    data = None
                finally:
                    await response.aclose()
            except httpx.TransportError as exc:
                raise _Retry(f"{type(exc).__name__}: {exc}") from exc
            error, retry = self._error_of(response.status_code, data)
            if retry:
                raise _Retry(error.message)
            raise self._translate(error) from error

        return await self._failover(attempt)

    async def _changes(self, key: str, start: int) -> AsyncGenerator[tuple[int, list[KV]], None]:
        """Watch ``key``'s range (``key`` is a prefix ending in '/') from revision ``start``:
        yields (header revision, raw events) per response, forever; reopens a dropped stream
        after the last yielded revision; ``Compacted`` when ``start`` is no longer kept."""
        create = {"key": _b64(key), "range_end": _b64(_range_end(key))}
        delay = 0.05
        while True:
            body = {"create_request": {**create, "start_revision": str(start)}}
            response = await self._open_watch(body)
            self.watches += 1
            try:
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    data = json.loads(line)
                    result = data.get("result")
                    if result is None:  # an error ("no leader"): try the next member
                        error, _ = self._error_of(200, data)
                        self.last_error = f"{response.url}: {error.message}"
                        self._current = (self._current + 1) % len(self.endpoints)
                        break
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
            except (httpx.TransportError, ValueError):
                pass  # dropped (etcd went away, or a broken line): reopen below
            finally:
                self.watches -= 1
                await response.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
