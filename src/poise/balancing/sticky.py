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
from collections.abc import Container, Iterable, Iterator, Sequence

from poise.balancing.base import Picker, Policy
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

    def candidates(
        self, key: bytes | None = None, up: Sequence[bool] | None = None
    ) -> Iterable[Backend]:
        pinned = self._by_value.get(key) if key is not None else None
        if pinned is None:
            return self._fallback.candidates(None, up)
        return _Pinned(pinned, self._fallback, up)

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        pinned = self._by_value.get(key) if key is not None else None
        if pinned is not None and up[pinned.index] and pinned not in tried:
            return pinned  # the fallback is not asked: a pinned client takes no one's turn
        # (the fallback handing out ``pinned`` again has it passed over, as by _Pinned)
        return self._fallback.pick(None, up, tried)

    def set_cookie(self, backend: Backend) -> bytes:
        """The Set-Cookie field value that pins a client to ``backend``."""
        return self.cookie + b"=" + self.values[backend.index] + b"; Path=/; HttpOnly; SameSite=Lax"

    def __repr__(self) -> str:
        return f"StickyPick({self.cookie.decode()}, {len(self._backends)} backends)"


class _Pinned:
    """The pinned backend, then (only if it is passed over) the fallback's candidates
    without it."""

    __slots__ = ("_fallback", "_pinned", "_rest", "_up")

    def __init__(self, pinned: Backend, fallback: Picker, up: Sequence[bool] | None) -> None:
        self._pinned, self._fallback, self._up = pinned, fallback, up
        self._rest: Iterator[Backend] | None = None

    def __iter__(self) -> Iterator[Backend]:
        return self

    def __next__(self) -> Backend:
        rest = self._rest
        if rest is None:
            self._rest = iter(self._fallback.candidates(None, self._up))
            return self._pinned
        for b in rest:
            if b is not self._pinned:
                return b
        raise StopIteration
