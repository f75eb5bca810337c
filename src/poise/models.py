"""Shared vocabulary: what a backend is. Imports nothing else from poise."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend instance of an upstream group. Immutable; identity is ``id``.

    ``index`` is its position in the group's backend tuple, so per-backend facts (health,
    in-flight counts) can live in flat lists indexed without hashing on the hot path.
    """

    id: str  # "host:port", unique within a group
    scheme: str
    host: str
    port: int
    weight: int = 1
    index: int = 0
    # Host header value sent to this backend for health checks: "host:port" (IPv6 bracketed)
    authority: str = field(default="", compare=False)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}"

    def __repr__(self) -> str:
        return f"Backend({self.url}, weight={self.weight})"


def authority_of(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
