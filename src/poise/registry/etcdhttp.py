"""``EtcdGateway``: how ``EtcdStore`` reaches etcd, by HTTP POSTs of JSON to etcd v3's gateway.

The gateway knows members, requests and failures, not keys: ``call()`` sends one unary request
(``/v3/kv/range``, ``/v3/kv/txn``, ``/v3/lease/...``) and returns the answer's JSON;
``stream()`` opens a watch and yields each response's ``result``. The store builds the bodies
and reads the answers (``poise.registry.etcd``).

Theory of operation
-------------------
**Endpoints and failures.** Requests go to the current endpoint; a connection failure, no
answer within ``attempt_timeout`` or an "unavailable" answer (no leader, leader changed) moves
to the next one and, after a full round, retries with backoff until ``timeout`` seconds have
passed; then ``StoreUnavailable``, and the store is *known down*: from then on calls fail at
once (a registry call answers 503 at once, not after ``timeout``) while a background probe
tries the members with a cheap read every ``PROBE_BACKOFF`` seconds at most; the first answer
ends it, and calls go through again. Requests carry etcd's "require leader" flag, so a member
without a leader says so at once, and a watch on a member cut off from the others is ended by
etcd (``stream()`` then ends and the next one starts on the next member).

**Errors.** An answer that another member or a retry may improve on (unavailable, deadline
exceeded, an HTTP 5xx, no etcd answer at all) is retried as above; any other refusal is a
``RegistryError``, or with ``raw_errors`` an ``EtcdError`` carrying etcd's code, for callers
that expect some (a lease that ran out: ``NOT_FOUND``).

**Connections** (``poise.registry.etcdwire``, a lean HTTP/1.1 client: httpx cost more per
call than etcd's own commit). Unary calls share one bounded keep-alive pool
(``CONNECTIONS``); every watch holds a connection of its own. The TLS context (the CA
bundle) is loaded once, and only when an endpoint is https.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from poise.errors import RegistryError, StoreUnavailable
from poise.registry.etcdwire import WireClient, WireError

__all__ = ["KV", "NOT_FOUND", "EtcdError", "EtcdGateway", "translate"]

log = logging.getLogger("poise.registry.etcd")  # the store's name: what operators filter on

CONNECTIONS = 64  # to etcd, for unary calls (watches have their own)
PROBE_BACKOFF = 0.5  # seconds at most between tries of the background probe while etcd is down
_RETRY_CODES = {4, 14}  # gRPC DeadlineExceeded, Unavailable: another member may answer
NOT_FOUND = 5  # gRPC NotFound: etcd's answer for an unknown (expired, revoked) lease
KV = dict[str, Any]
# every request asks for a member with a leader: one without answers "no leader" at once
# (instead of holding a write for etcd's 7 s request timeout), and a watch on a member cut off
# from the rest of the cluster is ended rather than left silent
_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}
T = TypeVar("T")


class _Retry(Exception):
    """This member could not answer (unreachable, no leader, overloaded): try another."""


class EtcdError(Exception):
    """etcd answered with an error that retrying elsewhere will not fix."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"etcd error {code}: {message}")
        self.code = code
        self.message = message


def translate(exc: EtcdError) -> RegistryError:
    return RegistryError(f"etcd refused a request: {exc.message} (code {exc.code})")


def _error_of(status: int, data: object) -> tuple[EtcdError, bool]:
    """An error answer -> (the error, whether another member or a retry may do better).
    Unary calls answer {"code", "message"} with an HTTP error status; streams (keepalive,
    watch) answer 200 and {"error": {"grpc_code", "http_code", "message"}}."""
    if not isinstance(data, dict):
        return EtcdError(-1, f"HTTP {status} with no etcd answer"), True
    err = data.get("error")
    try:
        if isinstance(err, dict):
            code, http = int(err.get("grpc_code", -1)), int(err.get("http_code", status))
            message = str(err.get("message"))
        else:
            code, http, message = int(data.get("code", -1)), status, str(data.get("message"))
    except (TypeError, ValueError):
        return EtcdError(-1, f"HTTP {status}: {str(data)[:200]}"), True
    return EtcdError(code, message), code in _RETRY_CODES or http >= 500


class EtcdGateway:
    """The members at ``endpoints``, tried in turn. ``probe`` is the body of the cheap
    ``/v3/kv/range`` request the background probe sends while etcd is known down."""

    def __init__(
        self, endpoints: Sequence[str], *, timeout: float, attempt_timeout: float, probe: KV
    ) -> None:
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self.attempt_timeout = min(attempt_timeout, timeout)
        self._probe_body = probe
        # keep-alive connections for unary calls (bounded), one of its own per watch; the CA
        # bundle is loaded only when an endpoint is https, and once
        self._wire = WireClient(limit=CONNECTIONS, headers=_REQUIRE_LEADER)
        self._current = 0
        self._closed = False
        self.requests = 0
        self.failovers = 0
        self.unavailable = 0
        self.watches = 0  # streams open now
        self.last_error = ""  # the last failure seen (of a member, a stream), for operators
        self._failing = False  # since the last answer: failures are logged once, not per call
        # set when a call gave up (no member answered for ``timeout``): until the background
        # probe reaches a member again, calls fail at once instead of each waiting ``timeout``
        self.down_since: float | None = None
        self._probe: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        """The member requests go to now."""
        return self.endpoints[self._current]

    async def call(self, path: str, body: KV, *, raw_errors: bool = False) -> KV:
        """One unary request; the answer's JSON. etcd's refusals raise ``EtcdError`` with
        ``raw_errors`` (for callers that expect some), else ``RegistryError``."""

        async def attempt(endpoint: str, left: float) -> KV:
            return await self._attempt(endpoint, path, body, left, raw_errors=raw_errors)

        return await self._failover(attempt)

    async def stream(self, body: KV) -> AsyncGenerator[KV, None]:
        """A watch (``body``: its create request) on a member that answers: yields each
        response's ``result``; ends when the stream drops (etcd went away, a broken line) or
        etcd ends it with an error ("no leader": the next stream goes to the next member)."""
        endpoint, lines = await self._open_watch(body)
        self.watches += 1
        try:
            async for line in lines:
                if not line.strip():
                    continue
                data = json.loads(line)
                result = data.get("result")
                if result is None:  # an error ("no leader"): try the next member
                    error, _ = _error_of(200, data)
                    self.last_error = f"{endpoint}: {error.message}"
                    self._current = (self._current + 1) % len(self.endpoints)
                    break
                yield result
        except (WireError, ValueError):
            pass  # dropped (etcd went away, or a broken line)
        finally:
            self.watches -= 1
            await lines.aclose()

    async def close(self) -> None:
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
        await self._wire.close()

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
                    if self._failing or self.down_since is not None:
                        self._recovered(endpoint)
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
        delay = 0.05
        while not self._closed and self.down_since is not None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, PROBE_BACKOFF)
            for _ in self.endpoints:
                endpoint = self.endpoints[self._current]
                try:
                    await self._attempt(
                        endpoint, "/v3/kv/range", self._probe_body, self.attempt_timeout
                    )
                except (_Retry, EtcdError, RegistryError) as exc:
                    self.last_error = f"{endpoint}: {exc}"
                    self._current = (self._current + 1) % len(self.endpoints)
                    continue
                self._probe = None
                self._recovered(endpoint)
                return

    def _recovered(self, endpoint: str) -> None:
        """``endpoint`` answered after a failure: the store is up. Said once per outage,
        by whichever noticed first: a call still retrying (it began before the store was
        known down) or the probe (which then stops)."""
        if self._failing or self.down_since is not None:
            self.down_since = None
            self._failing = False
            log.info("etcd member %s answers again", endpoint)

    async def _attempt(
        self, endpoint: str, path: str, body: KV, left: float, *, raw_errors: bool = False
    ) -> KV:
        """One unary request to one member (``_Retry`` when another may do better)."""
        if self._closed:
            raise StoreUnavailable("etcd store is closed")
        try:
            async with asyncio.timeout(left):
                response = await self._wire.post(endpoint, path, body)
        except WireError as exc:
            raise _Retry(str(exc)) from exc
        except TimeoutError as exc:
            raise _Retry(f"no answer within {left:.1f}s") from exc
        data = response.json()
        if response.status == 200 and isinstance(data, dict) and "error" not in data:
            return data
        error, retry = _error_of(response.status, data)
        if retry:
            raise _Retry(error.message)
        if raw_errors:
            raise error
        raise translate(error) from error

    async def _open_watch(self, body: KV) -> tuple[str, AsyncGenerator[bytes, None]]:
        async def attempt(endpoint: str, left: float) -> tuple[str, AsyncGenerator[bytes, None]]:
            if self._closed:
                raise StoreUnavailable("etcd store is closed")
            try:
                async with asyncio.timeout(left):  # (a quiet watch is not a dead one: only
                    # the connection and the response head have a deadline)
                    response, lines = await self._wire.open_stream(endpoint, "/v3/watch", body)
            except WireError as exc:
                raise _Retry(str(exc)) from exc
            except TimeoutError as exc:
                raise _Retry(f"no answer within {left:.1f}s") from exc
            if response.status == 200:
                return endpoint, lines
            error, retry = _error_of(response.status, response.json())
            if retry:
                raise _Retry(error.message)
            raise translate(error) from error

        return await self._failover(attempt)
