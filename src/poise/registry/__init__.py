"""The service registry: instances register, heartbeat within a TTL and deregister; poise
routes to what is alive. ``Store`` is the storage protocol (memory, SQLite, etcd).

``EtcdStore`` is imported on first use (``poise.registry.etcd``): a poise node's view of a
registry shared through etcd."""

from typing import TYPE_CHECKING, Any

from poise.registry.memory import MemoryStore
from poise.registry.model import (
    CRITICAL,
    PASSING,
    WARNING,
    Event,
    Instance,
    parse_instance,
)
from poise.registry.sqlite import SQLiteStore
from poise.registry.store import Store

if TYPE_CHECKING:
    from poise.registry.etcd import EtcdStore

__all__ = [
    "CRITICAL",
    "PASSING",
    "WARNING",
    "EtcdStore",
    "Event",
    "Instance",
    "MemoryStore",
    "SQLiteStore",
    "Store",
    "parse_instance",
]


def __getattr__(name: str) -> Any:
    if name == "EtcdStore":
        from poise.registry.etcd import EtcdStore

        return EtcdStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
