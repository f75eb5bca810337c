"""Sticky sessions by cookie: a client that has been served by a backend keeps going to it.

The cookie's value is an opaque id: ``HMAC-SHA256(secret, "host:port")``, its first 16 bytes
in hex (32 characters). It says nothing about the backend (its address never reaches the
client), clients cannot forge a pin to a backend of their choice (that needs the secret), and
several poise instances given the same secret compute the same id for the same backend. A
dict from id to backend, built with the table, finds the pinned backend in one lookup. A
request without a valid cookie, or pinned to a backend that is unhealthy (the caller skips
it) or gone, is placed by the fallback policy and gets a new cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections.abc import Container, Iterable, Sequence

from poise.balancing.base import Picker, Policy, first_usable
from poise.models import Backend


def opaque_id(secret: bytes, backend_id: str) -> bytes:
    """The cookie value pinning to the backend ``backend_id`` (``host:port``)."""
    return hmac.new(secret, backend_id.encode(), hashlib.sha256).hexdigest()[:32].encode()


class StickyPick(Policy):
    __slots__ = ("_backends", "_by_value", "_fallback", "cookie", "values")

    def __init__(
        self,
        backends: Sequence[Backend],
        rng: random.Random,
        fallback: Picker,
        cookie: str,
        secret: bytes,
    ) -> None:
        self._backends = tuple(backends)
        self._fallback = fallback
        self.cookie = cookie.encode("ascii")
        # the cookie value that pins to each backend, by index
        self.values = tuple(opaque_id(secret, b.id) for b in self._backends)
        self._by_value = dict(zip(self.values, self._backends, strict=True))

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        pinned = self._by_value.get(key) if key is not None else None
        if pinned is None:
            return self._fallback.candidates(None)
        rest = [b for b in self._fallback.candidates(None) if b is not pinned]
        return [pinned, *rest]

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        if key is None or key not in self._by_value:
            return self._fallback.pick(None, up, tried)
        # pinned: through candidates(), which also takes the fallback's turn (a shortcut
        # here would change what the next unpinned client gets)
        return first_usable(self.candidates(key), up, tried)

    def set_cookie(self, backend: Backend) -> bytes:
        """The Set-Cookie field value that pins a client to ``backend``."""
        return self.cookie + b"=" + self.values[backend.index] + b"; Path=/; HttpOnly; SameSite=Lax"

    def __repr__(self) -> str:
        return f"StickyPick({self.cookie.decode()}, {len(self._backends)} backends)"
