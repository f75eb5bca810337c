"""TLS passthrough routed by SNI: which upstream a TCP listener relays a connection to, from
the server name in its TLS ClientHello (``tls.clienthello``), without decrypting anything.

Theory of operation
-------------------
A TCP listener with ``sni`` routes starts every relay in ``Phase.PEEK`` (after a PROXY
header, if one is owed). The client's bytes are held in ``relay.pending`` as usual; each
time more arrive, ``SniRouter.peek`` reads them again from the start:

* *more*: the ClientHello is not complete yet; wait (the parser's ``limit`` bounds what is
  held, and the sweep closes a relay still peeking at ``timeouts.client_header``);
* *done*: the exact name's upstream, else the ``*.suffix`` wildcard's (one label: ``*.b.test``
  matches ``a.b.test``, not ``b.test`` nor ``x.a.b.test``), else the listener's default
  ``upstream`` (also when the client sent no SNI);
* *invalid*, or the client ended its side before a complete ClientHello: not TLS (or not
  a ClientHello we can read), so the default upstream.

Nothing is consumed: the chosen upstream's backend receives the held bytes as they came and
does the real handshake, so the client sees the backend's certificate.
"""

from __future__ import annotations

from collections.abc import Sequence

from poise.config.model import SniRouteConfig
from poise.tls.clienthello import read_server_name

__all__ = ["SniRouter"]


class SniRouter:
    """One TCP listener's SNI routes."""

    __slots__ = ("default", "exact", "wildcard")

    def __init__(self, default: str, routes: Sequence[SniRouteConfig]) -> None:
        self.default = default
        self.exact: dict[str, str] = {}
        self.wildcard: dict[str, str] = {}  # by the suffix after "*."
        for route in routes:
            for name in route.names:
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], route.upstream)
                else:
                    self.exact.setdefault(name, route.upstream)

    def match(self, name: str | None) -> str:
        """The upstream for a server name (None: no SNI)."""
        if name is None:
            return self.default
        upstream = self.exact.get(name)
        if upstream is not None:
            return upstream
        _, dot, parent = name.partition(".")
        if dot:
            upstream = self.wildcard.get(parent)
        return upstream if upstream is not None else self.default

    def peek(self, data: bytes, *, eof: bool = False) -> tuple[str, bool] | None:
        """``(upstream, readable)`` once ``data`` (every byte so far) decides, None while a
        ClientHello is still incomplete; ``readable`` is False for what is not a ClientHello
        (or one that ended early, ``eof``), which goes to the default upstream."""
        found = read_server_name(data)
        if found.state == "more":
            return (self.default, False) if eof else None
        if found.state == "done":
            return self.match(found.server_name), True
        return self.default, False
