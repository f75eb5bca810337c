"""The TLS object of poise's connections: ``ssl.SSLObject`` whose record methods are
``_ssl``'s own, without the Python wrappers in between.

Theory of operation
-------------------
The event loop's TLS transport (uvloop's ``SSLProtocol``) keeps ``read``, ``write`` and
``pending`` of the connection's ``SSLObject`` as bound methods and calls them for every
record: per keep-alive request a read, a write and two or three ``pending`` checks. On
``ssl.SSLObject`` each is a Python method that only passes its arguments on to the
``_ssl._SSLSocket`` underneath (``self._sslobj``), so each costs a Python call on top of
OpenSSL's work.

``DirectObject`` is that same object with the three names bound, per object, to the
``_SSLSocket``'s methods themselves: the transport then calls ``_ssl`` directly. Their
signatures are the wrappers' (``read(len[, buffer])``, ``write(data)``, ``pending()``),
except that ``read`` has no default length, which every transport passes. Everything else
(handshake, shutdown, certificates, session) is ``ssl.SSLObject``'s.

Contexts opt in with ``context.sslobject_class = DirectObject`` (``contexts.py`` does, for
listeners and backends): ``SSLContext.wrap_bio``, which the loop's TLS transports call,
then makes these. That is the path of connections to backends. Connections to HTTPS
listeners go through poise's own transport (``tls/transport.py``), whose engine works on
the ``_SSLSocket`` directly (``tls/engine.py``).
"""

from __future__ import annotations

import ssl
from typing import Any

__all__ = ["DirectObject"]


class DirectObject(ssl.SSLObject):
    """``ssl.SSLObject`` with ``read``, ``write`` and ``pending`` going straight to ``_ssl``."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> DirectObject:
        # what SSLContext.wrap_bio calls (a private hook: SSLObject's __init__ refuses to be
        # called directly); the instance attributes shadow the class's wrapper methods
        obj: DirectObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        inner = obj._sslobj  # type: ignore[attr-defined]
        obj.read = inner.read  # type: ignore[method-assign]
        obj.write = inner.write  # type: ignore[method-assign]
        obj.pending = inner.pending  # type: ignore[method-assign]
        return obj
