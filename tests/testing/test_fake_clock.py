"""poise.testing.FakeClock."""

from __future__ import annotations

import pytest

from poise.testing import FakeClock


def test_starts_where_told_and_moves_only_when_advanced() -> None:
    clock = FakeClock()
    assert clock.now() == 0.0 and clock() == 0.0
    clock = FakeClock(start=100.0)
    assert clock.now() == 100.0
    assert clock.advance(2.5) == 102.5
    assert clock() == clock.now() == 102.5
    clock.advance(0)
    assert clock.now() == 102.5
    assert repr(clock) == "FakeClock(now=102.5)"


def test_cannot_go_back() -> None:
    clock = FakeClock(5)
    with pytest.raises(ValueError):
        clock.advance(-1)
    assert clock.now() == 5.0
