"""``poise simulate``: what a policy does with traffic, before deploying it.

A discrete-event simulation on a fake clock, using the real policy code: requests arrive at
a steady rate, each picks a backend through the group's picker (health: all up), holds it for
that backend's latency, then reports back to the group's load. Keyed policies get keys from
a pool of simulated users, so hashing shows its real spread.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import dataclass

from poise.balancing import build, new_load
from poise.config.model import Config
from poise.models import Backend, authority_of
from poise.routing import make_backends

# names of this machine that a config and a command line may spell differently
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


class UnknownBackend(ValueError):
    """A latency was given for a backend the upstream does not have."""


@dataclass(frozen=True, slots=True)
class Share:
    backend: str
    requests: int
    fraction: float


def simulate(
    config: Config,
    upstream: str,
    requests: int,
    latency_ms: dict[str, float],
    *,
    rate: float = 1000.0,
    users: int = 1000,
    seed: int = 1,
) -> list[Share]:
    """Run ``requests`` requests through ``upstream``'s policy; return each backend's share.

    ``latency_ms`` maps a backend ("host:port" or its URL) to its latency; others take 1 ms.
    ``localhost``, ``127.0.0.1`` and ``::1`` name the same host. A key that names no backend
    of the upstream raises :class:`UnknownBackend`. ``rate`` is arrivals per second.
    """
    group = config.upstreams[upstream]
    backends = make_backends(group)
    latency = _latencies(upstream, backends, latency_ms)
    rng = random.Random(seed)
    now = [0.0]
    load = new_load(group.policy, len(backends))
    picker = build(group.policy, backends, rng, load, lambda: now[0])
    keyed = group.policy.key is not None
    in_flight: list[tuple[float, int, float]] = []  # (finish time, backend index, start)
    counts: Counter[int] = Counter()
    for n in range(requests):
        now[0] = n / rate
        while in_flight and in_flight[0][0] <= now[0]:
            done, i, started = heapq.heappop(in_flight)
            if load is not None:
                load.finished(i, done - started, True, done)
        key = f"user-{rng.randrange(users)}".encode() if keyed else None
        backend = next(iter(picker.candidates(key)))
        counts[backend.index] += 1
        if load is not None:
            load.started(backend.index)
        heapq.heappush(in_flight, (now[0] + latency[backend.index], backend.index, now[0]))
    return [Share(b.authority, counts[b.index], counts[b.index] / requests) for b in backends]


def _spellings(b: Backend) -> set[str]:
    hosts = _LOOPBACK if b.host.lower() in _LOOPBACK else (b.host.lower(),)
    names = {authority_of(h, b.port) for h in hosts}
    return names | {f"{b.scheme}://{n}" for n in names}


def _latencies(
    upstream: str, backends: tuple[Backend, ...], latency_ms: dict[str, float]
) -> list[float]:
    """Each backend's latency in seconds; every key of ``latency_ms`` must name a backend."""
    latency = [1.0] * len(backends)
    spellings = [_spellings(b) for b in backends]
    unknown = []
    for key, ms in latency_ms.items():
        hits = [i for i, names in enumerate(spellings) if key.lower() in names]
        for i in hits:
            latency[i] = ms
        if not hits:
            unknown.append(key)
    if unknown:
        known = ", ".join(b.authority for b in backends) or "none"
        raise UnknownBackend(
            f"upstream {upstream!r} has no backend {', '.join(map(repr, unknown))} "
            f"(its backends: {known})"
        )
    return [ms / 1000.0 for ms in latency]


def render(shares: list[Share], width: int = 40) -> str:
    name_w = max(len(s.backend) for s in shares)
    lines = []
    for s in shares:
        bar = "#" * round(s.fraction * width)
        lines.append(f"{s.backend:<{name_w}}  {s.fraction * 100:5.1f}%  {s.requests:>7}  {bar}")
    return "\n".join(lines)
