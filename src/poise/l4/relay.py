"""One relayed TCP connection: a client end and a backend end, both ``asyncio.Protocol``.

Theory of operation
-------------------
A ``Relay`` joins two transports. Each side is an ``End`` whose ``data_received`` writes
what was just read straight to the other side's transport (``out``):

* **One Python call per read.** The event loop reads into its own buffer and hands over the
  bytes read; ``data_received`` counts them and writes them on. Measured against a
  ``BufferedProtocol`` reading into a shared buffer of ours (``bench/l4.py``, same run), this
  costs less both for small messages (one callback per read instead of two, and no checks
  of the other side's write buffer to decide whether the shared buffer may be reused) and in
  bulk (uvloop reads up to 256,000 bytes at a time: fewer system calls per MiB than a 64 KiB
  buffer). The bytes object per read is the price; it is released once written.
* **Backpressure both ways.** A side whose write buffer passes its high-water mark gets
  ``pause_writing`` and pauses reading on the *other* side; ``resume_writing`` at the
  low-water mark resumes it. Memory per relay stays bounded whatever the speeds.
* **Half-close** (RFC 9293 §3.6: a FIN closes one direction only). ``eof_received`` on one
  side becomes ``write_eof`` (shutdown SHUT_WR) on the other, after its pending bytes, and
  returns True so the transport stays open for the reverse direction. Once both directions
  have seen EOF the relay closes.
* **Reset.** A side lost with an error (ECONNRESET, EPIPE) aborts the other side with
  SO_LINGER 0, so the peer sees a reset too rather than a clean end it could mistake for
  a complete stream. A side closed cleanly closes the other after flushing.

Before the backend is connected the client's bytes (and, from a trusted peer, its PROXY
header; on a listener with SNI routes, its TLS ClientHello, ``l4.sni``) are held in
``pending``, up to ``HOLD_LIMIT`` before client reading pauses. The
listener (``l4.listener``) chooses backends and connects; this module only moves bytes.

In a compiled install the listener then hands the connected pair to its C pump
(``l4/_pump.c``: ``L4.hand_over``), which moves the bytes with the same backpressure,
half-close and reset rules; the relay keeps only its bookkeeping (``pump_id``, the counts,
``pump_ended``). This module's protocols are the pump's pure-Python twin.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from poise.balancing import Load
    from poise.l4.listener import TcpListener
    from poise.models import Backend
    from poise.upstream.limits import Admission

HOLD_LIMIT = 64 * 1024  # client bytes held while the backend connects; beyond, reading pauses
_LINGER_RESET = struct.pack("ii", 1, 0)


class Phase(enum.Enum):
    HEADER = "header"  # reading a PROXY header from a trusted peer
    PEEK = "peek"  # reading a TLS ClientHello's server name (listeners with SNI routes)
    CONNECTING = "connecting"  # trying backends
    RELAYING = "relaying"
    CLOSED = "closed"


class End(asyncio.Protocol):
    __slots__ = ("count", "eof", "out", "relay", "transport")
    transport: asyncio.Transport  # set by connection_made

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.out: asyncio.Transport | None = None  # the other side's transport
        self.count = 0  # bytes read on this side
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        out = self.out
        if out is None:
            self.relay.hold(data)
        else:
            out.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.relay.half_closed(self)
        return True  # keep our sending side open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.listener.lingering.pop(self, None)  # flushed, or gone

    def pause_writing(self) -> None:
        if self.out is not None:
            self.out.pause_reading()

    def resume_writing(self) -> None:
        if self.out is not None:
            self.out.resume_reading()


class Front(End):
    """The client's side. Built by the listener's protocol factory, one per connection."""

    __slots__ = ("listener",)

    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        super().__init__(Relay(listener, self))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.listener.accepted(self.relay, t)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.relay.lost(self, exc)


class Back(End):
    """The backend's side, one per connect attempt (a late attempt closes itself)."""

    __slots__ = ("backend",)

    def __init__(self, relay: Relay, backend: Backend) -> None:
        super().__init__(relay)
        self.backend = backend

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        relay = self.relay
        if relay.attempt is not self or relay.expired or relay.phase is not Phase.CONNECTING:
            transport.close()  # timed out, or the client went away meanwhile
            return
        relay.attach(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.relay.back is self:
            self.relay.lost(self, exc)


def _reset(transport: asyncio.Transport) -> None:
    """Close with RST (SO_LINGER 0), so the peer learns the stream did not end cleanly."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already gone: abort() is all that is left
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class Relay:
    __slots__ = (
        "admission",
        "attempt",
        "back",
        "backend",
        "client",
        "connect_time",
        "deadline",
        "expired",
        "front",
        "group",
        "last",
        "listener",
        "load",
        "local",
        "pending",
        "phase",
        "pump_base",
        "pump_id",
        "seen",
        "task",
        "tried",
    )

    def __init__(self, listener: TcpListener, front: Front) -> None:
        self.listener = listener
        self.front = front
        self.back: Back | None = None  # the connected backend side
        self.attempt: Back | None = None  # the connect in progress
        self.backend: Backend | None = None  # whose load this relay counts in ...
        self.load: Load | None = None  # ... in these figures (the group's when it was chosen)
        self.admission: Admission | None = None
        self.tried: tuple[Backend, ...] = ()
        self.group = listener.cfg.upstream  # the upstream relayed to (SNI may choose another)
        self.phase = Phase.CONNECTING
        self.pending = bytearray()  # client bytes read before the backend was connected
        self.client: tuple[str, int] = ("", 0)  # the client (from a PROXY header if trusted)
        self.local: tuple[str, int] = ("", 0)  # the address it connected to
        self.deadline = 0.0  # header or connect deadline, on the sweep's clock
        self.expired = False  # the sweep timed out the connect in progress
        self.task: asyncio.Task[None] | None = None
        self.seen = 0  # bytes moved as of the last sweep, and when that changed:
        self.last = 0.0  # the idle timeout reads these, never the hot path
        self.connect_time = 0.0
        self.pump_id = 0  # relayed by the L4's C pump (l4/_pump.c) under this id; 0: not
        self.pump_base = (0, 0)  # the sides' byte counts when it was handed over

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def hold(self, data: bytes) -> None:
        """Client bytes before the backend is connected (or while reading a PROXY header or
        peeking at a ClientHello)."""
        if self.phase is Phase.CLOSED:
            return
        self.pending += data
        if self.phase is Phase.HEADER:
            self.listener.header_data(self)
        elif self.phase is Phase.PEEK:
            self.listener.peek_data(self)
        if self.phase is Phase.CONNECTING and len(self.pending) > HOLD_LIMIT:
            self.front.transport.pause_reading()  # resumed by attach()

    def attach(self, back: Back) -> None:
        """The backend is connected: send the PROXY header and what the client sent so far,
        then relay both ways."""
        front = self.front
        self.back = back
        self.phase = Phase.RELAYING
        transport = back.transport
        back.out = front.transport
        header = self.listener.proxy_header(self)
        if header or self.pending:
            transport.write(header + self.pending)
            self.pending = bytearray()
        front.out = transport
        if front.eof:
            transport.write_eof()
        front.transport.resume_reading()
        self.listener.connected(self, back.backend)
        self.listener.hub.hand_over(self)

    def sync(self) -> None:
        """A pumped relay's byte counts brought up to date (the sweep, statistics)."""
        if self.pump_id:
            counts = self.listener.hub.pump_counts(self.pump_id)
            if counts is not None:
                self.pumped(*counts)

    def pumped(self, client_bytes: int, backend_bytes: int) -> None:
        assert self.back is not None
        self.front.count = self.pump_base[0] + client_bytes
        self.back.count = self.pump_base[1] + backend_bytes

    def pump_ended(self, failed: int, client_bytes: int, backend_bytes: int) -> None:
        """The pump ended this relay: cleanly (``failed`` -1), or after an error on the
        client's (0) or the backend's (1) socket, both then closed with a reset."""
        self.pumped(client_bytes, backend_bytes)
        self.pump_id = 0
        if failed == 1:
            self.listener.stats.backend_resets += 1
        self.phase = Phase.CLOSED
        self.listener.finished(self)

    def half_closed(self, end: End) -> None:
        if self.phase is Phase.HEADER:
            self.listener.stats.proxy_errors += 1
            self.close()  # ended before its PROXY header did
            return
        if self.phase is Phase.PEEK:
            self.listener.peek_data(self)  # decides now: front.eof is set
        other = self.back if end is self.front else self.front
        if other is None:
            return  # the client's EOF before the backend is connected: attach() passes it on
        if other.eof:
            self.close()  # both directions are done
        elif end.out is not None and not end.out.is_closing():
            end.out.write_eof()

    def lost(self, end: End, exc: Exception | None) -> None:
        if self.phase is Phase.CLOSED or self.pump_id:
            return  # (a pumped relay's transports were closed when the pump took over)
        if exc is not None and end is self.back:
            self.listener.stats.backend_resets += 1
        self.close(reset=exc is not None)

    def connect_done(self, task: asyncio.Task[None]) -> None:
        """The connect task ended. Still connecting means it ended without resolving the
        relay (cancelled before its first step, say): nothing will, so close it."""
        if self.phase is Phase.CONNECTING:
            self.close()

    def on_timeout(self) -> None:
        """Called by the sweep when ``deadline`` (header, connect) or the idle time passed."""
        if self.phase is Phase.CONNECTING and self.task is not None and not self.task.done():
            self.expired = True
            self.task.cancel()  # the task goes on to the next backend
            return
        self.close(stuck=True)

    def close(self, *, reset: bool = False, stuck: bool = False) -> None:
        """Close both sides: with RST (``reset``); at once (``stuck``: a timeout, the bytes
        still buffered will not be taken); or after flushing, each side that still has bytes
        to send then lingering under the sweep's watch for up to ``idle_timeout``."""
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        if self.pump_id:  # at once: only timeouts and the end of a drain close a pumped relay
            counts = self.listener.hub.pump_close(self.pump_id, reset=reset)
            self.pump_id = 0
            if counts is not None:
                self.pumped(*counts)
            self.listener.finished(self)
            return
        front, back = self.front, self.back
        front.out = None
        if self.task is not None and not self.task.done():
            self.task.cancel()
        for end in (front, back):
            if end is None:
                continue
            end.out = None
            transport = end.transport
            if reset:
                _reset(transport)
            elif stuck and transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()  # after what is still buffered for it has been sent
                if transport.get_write_buffer_size():
                    self.listener.linger(end)
        self.listener.finished(self)

    def __repr__(self) -> str:
        who = f"{self.client[0]}:{self.client[1]}"
        to = self.backend.authority if self.backend is not None else "-"
        return f"Relay({who} -> {to}, {self.phase.value})"
