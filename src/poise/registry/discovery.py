"""From registered instances to an upstream's backends. Pure.

Several instances may share one address (a process re-registered under a new id before the
old registration expired): the address is the backend, so they become one, with the highest
weight, reported fine when any of them is. Weight 0 means "registered, but send nothing new":
the backend drains. Instances whose scheme the upstream cannot speak (``tcp`` behind an HTTP
listener) are left out.
"""

from __future__ import annotations

from collections.abc import Iterable

from poise.config.model import BackendConfig
from poise.models import authority_of
from poise.registry.model import CRITICAL, Instance

HTTP_SCHEMES = ("http", "https")


def backends_of(
    instances: Iterable[Instance], schemes: tuple[str, ...] = HTTP_SCHEMES
) -> tuple[tuple[BackendConfig, ...], list[bool]]:
    """The backends for ``instances`` (in a stable order: by address) and, for each, whether
    the registry reports it fine (not ``critical``)."""
    merged: dict[tuple[str, str, int], tuple[int, bool]] = {}
    for inst in instances:
        if inst.scheme not in schemes:
            continue
        key = (inst.scheme, inst.host, inst.port)
        weight, ok = merged.get(key, (-1, False))
        merged[key] = (max(weight, inst.weight), ok or inst.status != CRITICAL)
    backends = []
    reported = []
    for (scheme, host, port), (weight, ok) in sorted(merged.items()):
        url = f"{scheme}://{authority_of(host, port)}"
        state = "enabled" if weight > 0 else "drain"
        backends.append(BackendConfig(url, scheme, host, port, max(weight, 1), state))
        reported.append(ok)
    return tuple(backends), reported
