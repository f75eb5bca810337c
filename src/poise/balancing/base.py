"""The one interface every balancing policy offers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from poise.models import Backend


class Picker(Protocol):
    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        """Every backend at most once, best first. Iterated lazily by the caller, which
        usually stops at the first usable one (healthy, enabled, not yet tried)."""
        ...
