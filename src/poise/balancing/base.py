"""The one interface every balancing policy offers, and the base class giving ``pick``.

``candidates(key)`` is the policy: every backend at most once, best first. ``pick(key, up,
tried)`` is the proxy's per-request call: the first of those candidates that is up and not
yet tried. It must return exactly what filtering ``candidates(key)`` would, and change the
picker's state (round-robin position, random draws) exactly as one ``candidates`` call
does; the base class does it that way. Policies override it because on the hot path the
first candidate nearly always does, and building the lazy rest of the order (chains,
iterator objects) cost as much as choosing the backend. tests/balancing check the two agree.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from typing import Protocol

from poise.models import Backend


class Picker(Protocol):
    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        """Every backend at most once, best first. Iterated lazily by the caller, which
        usually stops at the first usable one (healthy, enabled, not yet tried)."""
        ...

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        """The first of ``candidates(key)`` with ``up[backend.index]`` and not in ``tried``,
        or None; the same effect on the picker's state as one ``candidates(key)`` call."""
        ...


def first_usable(
    order: Iterable[Backend], up: Sequence[bool], tried: Container[Backend]
) -> Backend | None:
    """The first backend of ``order`` that is up and not in ``tried``, or None."""
    for b in order:
        if up[b.index] and b not in tried:
            return b
    return None


def ring_from(twice: tuple[Backend, ...], start: int) -> Iterable[Backend]:
    """The ring order from position ``start``, given the backends laid out twice: lazy, and
    the same cost at any start (``islice(b, start, None)`` steps over ``start`` backends)."""
    return map(twice.__getitem__, range(start, start + len(twice) // 2))


class Policy:
    """Base of the policies: ``pick`` by filtering ``candidates`` (overridden where a
    policy can answer for its first candidate without building the rest)."""

    __slots__ = ()

    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        raise NotImplementedError

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        return first_usable(self.candidates(key), up, tried)
