"""An exchange's attempts: backend choice beyond the common case, waiting for a slot,
connecting, and what a failed attempt leads to (passive health, a retry, or an error answer).

These are the request path's cold parts, taken out of the client protocol
(``ClientConnection`` keeps the byte stream, the pipeline, flow control and timeouts, and the
common case of dispatch, which runs on every request): plain functions of the client
connection and the exchange. ``ClientConnection.dispatch`` calls ``choose`` for groups with
draining or slow-starting backends or request limits, and ``connect`` when no pooled
connection is idle; the upstream protocol reports failures through the client's lifecycle
methods, which land here.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from poise import failures
from poise.failures import Answer, AttemptFailure
from poise.l7 import http
from poise.l7.request import Exchange, settle
from poise.l7.upstream import UpstreamConnection
from poise.l7.verdicts import may_retry, passive_failure
from poise.netreasons import describe_error
from poise.selection import select

if TYPE_CHECKING:
    from poise.l7.client import ClientConnection
    from poise.models import Backend
    from poise.routing import Group
    from poise.upstream.limits import Admission
    from poise.upstream.pool import Pool

log = logging.getLogger("poise.proxy")


def choose(
    client: ClientConnection, ex: Exchange, group: Group, key: bytes | None
) -> Backend | None:
    """Dispatch's slow path, for groups with draining or slow-starting backends or request
    limits. None when ``ex`` was answered or parked instead."""
    backend, limited = select(group, key, ex.tried, client.ctx.rng.random, pin=True)
    if backend is not None:
        return backend
    if limited:
        assert group.admission is not None
        park(client, ex, group.admission)
    else:
        none_left(client, ex)
    return None


def none_left(client: ClientConnection, ex: Exchange) -> None:
    """No backend is left to try for ``ex``."""
    if ex.unreachable >= len(ex.tried):
        # None is up, or every one tried refused (or did not answer) the connection:
        # nothing was sent anywhere, no server could take the request (HAProxy's 503).
        give(client, ex, failures.NO_HEALTHY_BACKEND)
    else:  # a backend had the request and failed it
        give(client, ex, failures.UPSTREAM_ERROR)


def give(client: ClientConnection, ex: Exchange, answer: Answer) -> None:
    """Answer ``ex`` with one of poise's own errors (failures.py), counted once."""
    client.ctx.stats.count(answer.counter)
    client.answer(ex, answer.status, answer.message)


def park(client: ClientConnection, ex: Exchange, adm: Admission) -> None:
    """No backend has a free slot: wait in the group's queue, or 503 when it is full."""
    ctx = client.ctx
    if ex.queued_until:
        adm.park_first(Parked(client, ex), ex.queued_until)  # woken, but beaten to it
        return
    waiter = Parked(client, ex)
    now = ctx.clock()
    if adm.park(waiter, now):
        ex.queued_until = now + adm.cfg.queue_timeout
        ctx.stats.queued += 1
    else:
        give(client, ex, failures.QUEUE_FULL)


async def connect(client: ClientConnection, ex: Exchange, backend: Backend) -> None:
    ctx = client.ctx
    group = ex.group
    assert group is not None
    pool: Pool[UpstreamConnection] = group.pools[backend.index]
    timeout = group.config.retry.per_try_timeout or ctx.upstream_response_timeout
    total = group.retry_timeout or ctx.upstream_response_timeout
    t = ctx.tls_for(group.name) if backend.scheme == "https" else None
    connect_timeout = ctx.config.timeouts.upstream_connect
    now = ctx.clock()
    if not ex.until:  # the first try: retry.timeout counts from now
        ex.until = now + total
    left = ex.until - now  # retry.timeout bounds the connect too
    cut = left < connect_timeout
    if cut:
        connect_timeout = max(left, 0.0)
    try:
        # upstream_connect bounds the TLS handshake too; a failed one sent nothing
        _, conn = await asyncio.wait_for(
            ctx.loop.create_connection(
                lambda: UpstreamConnection(ctx, pool, backend, timeout, total),
                backend.host,
                backend.port,
                ssl=t.context if t is not None else None,
                server_hostname=t.name_for(backend.host) if t is not None else None,
            ),
            connect_timeout,
        )
    except (TimeoutError, OSError) as exc:
        _connect_failed(client, ex, backend, exc, cut=cut)
        return
    pool.connects += 1
    if client.closed or not client.queue or client.queue[0] is not ex:
        if not pool.put(conn, ctx.now):
            conn.close()
        return
    transport = conn.transport
    if conn.closed or transport is None or transport.is_closing():
        # The backend closed it before anything was sent (it accepted and went away: killed,
        # say, between the connect and now): a failed connect, not an error of poise's.
        _connect_failed(client, ex, backend, ConnectionResetError("closed at once"), cut=False)
        return
    client.attach(ex, conn)


def connect_failed(client: ClientConnection, ex: Exchange, backend: Backend, exc: OSError) -> None:
    """A connect made for ``ex`` failed (h2/upstream.py's, which ``ex`` waited for)."""
    _connect_failed(client, ex, backend, exc, cut=False)


def _connect_failed(
    client: ClientConnection, ex: Exchange, backend: Backend, exc: OSError, *, cut: bool
) -> None:
    """A connect to ``backend`` for ``ex`` failed (``cut``: it was given only what was left
    of the request's retry.timeout). Nothing was sent, so another backend may take it."""
    ctx = client.ctx
    group = ex.group
    assert group is not None
    ctx.stats.count(failures.CONNECT.counter)
    if not isinstance(exc, ssl.SSLError):
        ex.unreachable += 1
    reason = describe_error(exc)
    log.debug("connect to %s failed: %s", backend.authority, reason)
    if ex.load is not None:
        settle(ex, ok=False)
    expired = ctx.clock() >= ex.until
    if not (cut and expired and isinstance(exc, TimeoutError)):
        # (a connect cut short by the request's total timeout says nothing of the backend)
        passive_failure(ctx, group, backend, reason)
    if not client.closed and client.queue and client.queue[0] is ex:
        # Nothing was sent: another backend may take it, whatever the method.
        current = ctx.table.groups.get(group.name, group)
        if expired:
            give(client, ex, failures.UPSTREAM_TIMEOUT)
        elif (
            len(ex.tried) < group.config.retry.attempts
            and failures.CONNECT.retry_on in group.config.retry.on
        ):
            ctx.stats.retries += 1
            client.dispatch(ex, current)
        else:
            none_left(client, ex)


def retry(client: ClientConnection, ex: Exchange) -> None:
    """Send ``ex`` again, to another backend (``may_retry`` said it may)."""
    ctx = client.ctx
    ctx.stats.retries += 1
    if not ex.retrying:
        ex.retrying = True
        ctx.retries_active += 1
    ex.conn = None
    if ex.kept:
        ex.pending = tuple(ex.kept)
    assert ex.group is not None
    client.dispatch(ex, ctx.table.groups.get(ex.group.name, ex.group))


def upstream_failed(
    client: ClientConnection, ex: Exchange, failure: AttemptFailure, reusable_retry: bool
) -> None:
    """The upstream connection of ``ex`` failed (failures.py): RESET (lost before any
    response byte), BROKEN (lost or malformed mid-response) or TIMEOUT. Called by
    UpstreamConnection."""
    ex.conn = None
    if (
        reusable_retry
        and ex.stale_retries == 0
        and not ex.has_body
        and not client.closed
        and ex.method.decode() in http.IDEMPOTENT_METHODS
        and ex.backend is not None
    ):
        # A reused keep-alive connection the backend had already closed: nothing was
        # processed, so the request goes again on a fresh connection (not a retry: no
        # backend failed; it still counts in the backend's load).
        ex.stale_retries += 1
        if ex.group is not None and ex.group.mux:  # HTTP/2 backends: another stream
            client.mux_again(ex, ex.backend)
            return
        client.ctx.spawn(connect(client, ex, ex.backend))
        return
    ctx = client.ctx
    ctx.stats.count(failure.counter)
    if ex.load is not None:
        settle(ex, ok=False)
    if client.closed:
        return
    if ex.response_started:
        # Part of the response is already out: the only honest signal is to cut the
        # connection, so the client sees a truncated message, never a spliced one.
        if ex.group is not None and ex.backend is not None:
            passive_failure(ctx, ex.group, ex.backend, failure.passive)
        client.close()
        return
    if ex.group is not None and ex.backend is not None:
        passive_failure(ctx, ex.group, ex.backend, failure.passive)
    if may_retry(ctx, ex, failure.retry_on, client_closed=client.closed):
        retry(client, ex)
    else:
        give(client, ex, failure.answer)


class Parked:
    """A request waiting in its group's queue for a free slot (``upstream.limits``)."""

    __slots__ = ("client", "ex")

    def __init__(self, client: ClientConnection, ex: Exchange) -> None:
        self.client = client
        self.ex = ex

    def gone(self) -> bool:
        client, ex = self.client, self.ex
        return client.closed or not client.queue or client.queue[0] is not ex

    def resume(self) -> None:
        ex = self.ex
        assert ex.group is not None
        self.client.dispatch(ex, self.client.ctx.table.groups.get(ex.group.name, ex.group))

    def expire(self) -> None:
        give(self.client, self.ex, failures.QUEUE_TIMEOUT)
