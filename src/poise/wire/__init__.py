"""HTTP listeners' client connections: accepted, read and written by poise's own C code
(``wire/_hub.c``) instead of the event loop's transports.

Theory of operation
-------------------
A new plain connection through uvloop costs more in the transport than in poise's own work:
a ``TCPTransport`` object, ``getsockname`` and ``getpeername`` at ``connection_made``, a
context copy, and libuv's epoll registration (batched through io_uring: two more system
calls per connection). nginx spends about half as much user-space CPU on the same
connection (``bench/results/conn-wire-2026-12-05.md``).

A *hub* (one per event loop) owns an epoll descriptor that the loop watches as one reader
(``loop.add_reader(hub.fileno(), hub.run)``). Listening sockets are added to it; a ready one
accepts a connection, makes the listener's protocol and a ``Conn`` for it: a C object that
behaves as an ``asyncio.Transport`` (the methods poise's protocols call: ``write``,
``writelines``, ``write_eof``, ``close``, ``abort``, reading pauses, buffer limits with
``pause_writing``/``resume_writing``, ``get_extra_info("peername"/"sockname")``,
``set_protocol``). Reads are one ``recv`` and one ``data_received``; writes go to the socket
at once, and what it does not take waits in the ``Conn`` until it is writable again.
``connection_lost`` comes from the loop (``call_soon``), once, as with asyncio.

The pure-Python twin is the event loop's own server: ``create_server`` binds through
``loop.create_server`` either way (the same addresses, options and errors) and, without the
C module or with ``use_native`` off, serves with it as before. Both pass the same tests
(``tests/wire``, and the listener tests run with each).

One call a ``Conn`` has beyond ``asyncio.Transport``: ``write_last(pieces)``, the
connection's last bytes and then ``close()``. They are sent with ``MSG_MORE`` so that the
kernel holds them for the FIN the close adds at once: the response's end and the FIN leave
in one segment (nginx and the loop's transports send two), which spares a packet and a
wake-up of the client per connection. ``ClientConnection.forward_last`` (a response after
which the connection closes) and the TLS transport's ``write_last`` use it when their
transport has it.

HTTPS listeners use it too: their TLS transport (``tls/transport.py``) sits on a ``Conn``
as it sat on the loop's transport. TCP listeners do not (the L4 pump takes their sockets).

What a ``Conn`` does not offer: ``get_extra_info("socket")`` (the descriptor is the hub's
alone: a duplicate would keep it in the epoll set after its close); ``sockname`` after the
connection's end unless it was asked before (it is asked of the socket when first wanted,
not at every accept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import weakref
from collections.abc import Callable
from typing import Any

_native: Any
try:
    from poise.wire import _hub as _native
except ImportError:  # not built (pure-Python install, another OS): the loop's transports
    _native = None

__all__ = ["HubServer", "create_server", "native_error", "shutdown", "use_native"]

log = logging.getLogger("poise.wire")

use_native = True  # tests set it to run the twin
ACCEPT_RETRY = 1.0  # seconds without accepting after running out of descriptors

_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()


def native_error() -> str | None:
    """None when plain listeners are served by the C hub, else why not."""
    if _native is None:
        return "not built"
    if not sys.platform.startswith("linux"):
        return f"no epoll on {sys.platform}"  # pragma: no cover - built on Linux only
    return None


def _hub(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's hub, made and watched on first use."""
    hub = _hubs.get(loop)
    if hub is None:

        def on_error(message: str, exc: BaseException | None, subject: Any) -> None:
            if isinstance(subject, int):  # a listener out of descriptors (or memory)
                log.error(
                    "%s (%s): new connections wait %.0f s on this listener",
                    message, exc, ACCEPT_RETRY,
                )  # fmt: skip
                loop.call_later(ACCEPT_RETRY, _resume, hub, subject)
                return
            context: dict[str, Any] = {"message": message, "exception": exc}
            if subject is not None:
                context["transport"] = subject
                context["protocol"] = subject.get_protocol()
            loop.call_exception_handler(context)

        hub = _native.Hub(loop.call_soon, on_error)
        loop.add_reader(hub.fileno(), hub.run)
        _hubs[loop] = hub
    return hub


def _resume(hub: Any, listener: int) -> None:
    with contextlib.suppress(ValueError):  # closed meanwhile
        hub.resume(listener)


def shutdown(loop: asyncio.AbstractEventLoop) -> None:
    """End the loop's hub, if it has one: what connections remain are closed (their
    protocols get ``connection_lost``), and the loop stops watching it."""
    hub = _hubs.pop(loop, None)
    if hub is not None:
        loop.remove_reader(hub.fileno())
        hub.close()


class HubServer:
    """A bound listener served by the hub: the part of ``asyncio.Server`` poise uses."""

    def __init__(
        self,
        bound: asyncio.Server,
        hub: Any,
        factory: Callable[[], asyncio.BaseProtocol],
        backlog: int,
    ) -> None:
        self.bound = bound  # the loop's server: it holds the sockets and closes them
        self.hub = hub
        self.factory = factory
        self.backlog = backlog
        self.listening: list[int] = []  # the hub's listener ids

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self.bound.sockets)

    def is_serving(self) -> bool:
        return bool(self.listening)

    async def start_serving(self) -> None:
        if not self.listening:
            for sock in self.sockets:
                self.listening.append(self.hub.listen(sock.fileno(), self.factory, self.backlog))

    def close(self) -> None:
        """Accept no more (connections already made go on); the sockets are closed."""
        if self.hub.fileno() >= 0:  # (after wire.shutdown, the hub has let them go)
            for listener in self.listening:
                self.hub.unlisten(listener)
        self.listening.clear()
        self.bound.close()


async def create_server(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.BaseProtocol],
    *,
    backlog: int,
    sock: Any = None,
    host: str | None = None,
    port: int = 0,
    reuse_address: bool | None = None,
    own: bool = True,
) -> asyncio.Server | HubServer:
    """A listener bound as ``loop.create_server`` binds, not serving until
    ``start_serving()``: served by the hub, or by the loop (the twin; always when ``own``
    is False: TLS and TCP listeners)."""
    if sock is not None:
        bound = await loop.create_server(factory, sock=sock, backlog=backlog, start_serving=False)
    else:
        bound = await loop.create_server(
            factory,
            host=host,
            port=port,
            reuse_address=reuse_address,
            backlog=backlog,
            start_serving=False,
        )
    if not own or not use_native or native_error() is not None:
        return bound
    return HubServer(bound, _hub(loop), factory, backlog)
