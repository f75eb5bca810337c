"""The one exception tree of poise.

::

    PoiseError
    ├── ConfigError          bad configuration; ``problems`` lists every one, with its dotted path
    ├── ProxyError           a request could not be sent anywhere (client-side balancing)
    │   └── NoHealthyBackend       503, no usable instance of the service
    └── RegistryError        the service registry refused or could not do something
        ├── InvalidInstance      400, a registration is malformed; ``problems`` names each field
        ├── NotRegistered        404, heartbeat or lookup of an instance that is not there
        ├── Compacted            410, a watch asked for history the store no longer keeps
        ├── StoreUnavailable     503, the store (etcd) cannot be reached
        └── RegistryUnreachable  503, (SDK side) the registry API does not answer

Each class carries the HTTP status it maps to (``status``): the registry API answers a
RegistryError with it, by type. The proxy itself raises none of these on the request path:
a failed request is answered from the failure table (failures.py), which names the status,
message, counters, retry condition and passive-health reason of each kind of failure.

Foreign exceptions (OSError, httptools errors) are translated once, where they are caught,
with ``raise ... from exc``.
"""

from __future__ import annotations

from poise import failures


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


class ProxyError(PoiseError):
    """A request could not be sent anywhere. ``status`` is what an HTTP answer would say."""

    status = 502


class NoHealthyBackend(ProxyError):
    status = failures.NO_HEALTHY_BACKEND.status


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
