"""The one exception tree of poise.

::

    PoiseError
    ├── ConfigError          bad configuration; ``problems`` lists every one, with its dotted path
    ├── ProxyError           a request could not be proxied; carries source, retryable, status
    │   ├── NoHealthyBackend       503, nothing to send the request to
    │   ├── UpstreamConnectError   502, connecting to a backend failed (nothing was sent: retryable)
    │   ├── UpstreamTimeout        504, the backend did not answer in time
    │   └── UpstreamProtocolError  502, the backend broke HTTP framing or closed mid-response
    └── RegistryError        the service registry refused or could not do something
        ├── InvalidInstance      400, a registration is malformed; ``problems`` names each field
        ├── NotRegistered        404, heartbeat or lookup of an instance that is not there
        ├── Compacted            410, a watch asked for history the store no longer keeps
        ├── StoreUnavailable     503, the store (etcd) cannot be reached
        └── RegistryUnreachable  503, (SDK side) the registry API does not answer

Foreign exceptions (OSError, httptools errors) are translated once, where they are caught,
with ``raise ... from exc``.
"""

from __future__ import annotations

from enum import Enum


class PoiseError(Exception):
    """Root of every error poise raises on purpose."""


class ConfigError(PoiseError):
    """The configuration is invalid. ``problems`` holds every problem found, each prefixed by
    the dotted path of the offending value (``routes[0].upstream: unknown upstream 'x'``)."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration{where}:\n{lines}")


class ErrorSource(Enum):
    CLIENT = "client"
    UPSTREAM = "upstream"
    INTERNAL = "internal"


class ProxyError(PoiseError):
    """A request failed. ``status`` is what the client gets; ``retryable`` says whether another
    backend may be tried (only when nothing of the request can have been processed)."""

    status = 502
    source = ErrorSource.UPSTREAM
    retryable = False
    public_message = "Bad Gateway"


class NoHealthyBackend(ProxyError):
    status = 503
    source = ErrorSource.INTERNAL
    public_message = "No healthy server available"


class UpstreamConnectError(ProxyError):
    status = 502
    retryable = True
    public_message = "Bad Gateway"


class UpstreamTimeout(ProxyError):
    status = 504
    public_message = "Gateway Timeout"


class UpstreamProtocolError(ProxyError):
    status = 502
    public_message = "Bad Gateway"


class RegistryError(PoiseError):
    """The service registry refused a request or could not carry it out."""

    status = 500


class InvalidInstance(RegistryError):
    """A registration is malformed. ``problems`` lists every one, each naming its field."""

    status = 400

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid registration: " + "; ".join(self.problems))


class NotRegistered(RegistryError):
    status = 404

    def __init__(self, service: str, instance: str) -> None:
        self.service = service
        self.instance = instance
        super().__init__(f"instance {instance!r} of service {service!r} is not registered")


class Compacted(RegistryError):
    """Events after ``after`` are no longer kept (the oldest kept is ``oldest``): list the
    current state again and watch from its revision."""

    status = 410

    def __init__(self, after: int, oldest: int) -> None:
        self.after = after
        self.oldest = oldest
        super().__init__(
            f"revision {after} is compacted (history starts after {oldest}): list and re-watch"
        )


class StoreUnavailable(RegistryError):
    status = 503


class RegistryUnreachable(RegistryError):
    """The registry API did not answer (refused, timed out, 5xx): raised by ``poise.client``,
    whose background tasks retry with backoff instead."""

    status = 503
