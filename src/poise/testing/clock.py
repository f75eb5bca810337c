"""`FakeClock`: a manually driven monotonic clock for deterministic time-based tests.

Pass `clock` (or `clock.now`) wherever code takes a ``Callable[[], float]`` time
source (e.g. instead of ``time.monotonic``), then move time with `advance()`.
"""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move forward by `seconds` (>= 0, so the clock stays monotonic); returns the new time."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back ({seconds} s)")
        self._now += seconds
        return self._now

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r})"
