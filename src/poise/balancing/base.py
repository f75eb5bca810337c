"""The one interface every balancing policy offers, and the base class giving ``pick``.

``candidates(key)`` is the policy: every backend at most once, best first, handed out
lazily. The caller stops at the backend it takes, so asking for another means the one
before was passed over (down, drained, tried, at a limit), and the policy then chooses as
if it had not been there: round robin's cursor moves past the backend taken, smooth WRR and
least-conn's tie-break run their round again without it, random policies draw again among
those not handed out yet. That is what makes a missing backend's share go to all the others
(each of k usable backends gets 1/k, or its weight's part) rather than to its neighbour. A
picker's state therefore moves as the candidates are taken from it: iterate one ``candidates``
result at a time, and stop at the backend you take.

``pick(key, up, tried)`` is the proxy's per-request call: the first of those candidates that
is up and not yet tried. It must return exactly what filtering ``candidates(key, up)`` would,
and change the picker's state exactly as that does; the base class does it that way.
Policies override it because on the hot path the first candidate nearly always does, and
building the lazy rest of the order cost as much as choosing the backend. tests/balancing
check the two agree.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from typing import Protocol

from poise.models import Backend


class Picker(Protocol):
    def candidates(
        self, key: bytes | None = None, up: Sequence[bool] | None = None
    ) -> Iterable[Backend]:
        """Every backend at most once, best first. Iterated lazily by the caller, which
        stops at the one it takes (healthy, enabled, not yet tried): each one asked for
        after the first means the one before was passed over. ``up``, when given, is the
        health by ``Backend.index``: a policy that keeps rounds (smooth WRR, least-conn's
        tie-break) leaves those not up out of them from the start, as nginx does; they
        may still be handed out (last, or by other policies anywhere) to be passed over."""
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


class Policy:
    """Base of the policies: ``pick`` by filtering ``candidates`` (overridden where a
    policy can answer for its first candidate without building the rest)."""

    __slots__ = ()

    def candidates(
        self, key: bytes | None = None, up: Sequence[bool] | None = None
    ) -> Iterable[Backend]:
        raise NotImplementedError

    def pick(
        self, key: bytes | None, up: Sequence[bool], tried: Container[Backend]
    ) -> Backend | None:
        return first_usable(self.candidates(key, up), up, tried)
