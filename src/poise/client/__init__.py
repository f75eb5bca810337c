"""The Python SDK of the poise registry: register and heartbeat, resolve, balance in httpx.

::

    async with AsyncRegistry("http://127.0.0.1:8500").register("users", port=8001):
        ...                                      # registered, heartbeating, re-registering

    client = httpx.AsyncClient(transport=AsyncBalancingTransport("http://127.0.0.1:8500"))
    await client.get("http://users/v1/me")       # an instance of "users", picked by policy

Needs httpx (``pip install 'poise[client]'``). Errors are :class:`poise.errors.RegistryError`
subclasses; :class:`RegistryUnreachable` when the registry does not answer.
"""

try:
    import httpx as _httpx  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "poise.client needs httpx: pip install 'poise[client]' (or: pip install 'httpx>=0.27')"
    ) from exc

from poise.client.aio import AsyncRegistration, AsyncRegistry, AsyncResolver
from poise.client.core import ServiceView
from poise.client.sync import Registration, Registry, Resolver
from poise.client.transport import AsyncBalancingTransport, BalancingTransport
from poise.errors import RegistryUnreachable

__all__ = [
    "AsyncBalancingTransport",
    "AsyncRegistration",
    "AsyncRegistry",
    "AsyncResolver",
    "BalancingTransport",
    "Registration",
    "Registry",
    "RegistryUnreachable",
    "Resolver",
    "ServiceView",
]
