"""A byte tunnel between a client and a backend, after a real ``101 Switching Protocols``.

Theory of operation
-------------------
Only the backend's 101 turns an HTTP exchange into a tunnel (RFC 9110 §15.2.2): until then
the client's bytes after its upgrade request are held, unparsed, and a refused upgrade goes
back to HTTP parsing. Once switched, both transports are handed to a pair of ``_End``
protocols (``transport.set_protocol``) that copy bytes across with backpressure (a full
write buffer on one side pauses reading on the other), pass a half-close on as a half-close
(where the other side cannot be half-closed, a TLS connection to a backend, the tunnel
ends), and close both sides when either goes away or the tunnel has been silent for its
idle timeout (checked by the context's timer sweep).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from poise.l7.context import Context


class _End(asyncio.Protocol):
    __slots__ = ("eof", "peer", "transport", "tunnel")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: _End = self
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)
        tunnel = self.tunnel
        tunnel.deadline = tunnel.ctx.clock() + tunnel.idle

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer.eof:
            self.tunnel.close()
            return False
        if self.peer.transport.can_write_eof():
            self.peer.transport.write_eof()
            return True  # keep our sending side open: the other direction may still flow
        # the other side cannot be half-closed (TLS to a backend): the tunnel ends
        self.tunnel.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close()

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()


class Tunnel:
    __slots__ = ("backend", "client", "closed", "ctx", "deadline", "idle")

    def __init__(
        self,
        ctx: Context,
        client: asyncio.BaseTransport,
        backend: asyncio.BaseTransport,
        idle: float,
    ) -> None:
        self.ctx = ctx
        self.idle = idle
        self.deadline = ctx.clock() + idle
        self.closed = False
        self.client = _End(self, cast(asyncio.Transport, client))
        self.backend = _End(self, cast(asyncio.Transport, backend))
        self.client.peer, self.backend.peer = self.backend, self.client
        for end in (self.client, self.backend):
            end.transport.set_protocol(end)
            end.transport.resume_reading()  # whatever paused it belonged to the HTTP phase
        ctx.tunnels.add(self)
        ctx.stats.tunnels += 1

    def send(self, to_client: bytes, to_backend: bytes) -> None:
        """Bytes that arrived before the switch: the backend's after its 101, the client's
        after its upgrade request."""
        if to_client:
            self.client.transport.write(to_client)
        if to_backend:
            self.backend.transport.write(to_backend)

    def on_timeout(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.ctx.tunnels.discard(self)
            self.client.transport.close()
            self.backend.transport.close()

    def __repr__(self) -> str:
        return f"Tunnel(closed={self.closed})"
