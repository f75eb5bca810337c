"""The service registry: instances register, heartbeat within a TTL and deregister; poise
routes to what is alive. ``Store`` is the storage protocol (memory, SQLite, etcd)."""

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

__all__ = [
    "CRITICAL",
    "PASSING",
    "WARNING",
    "Event",
    "Instance",
    "MemoryStore",
    "SQLiteStore",
    "Store",
    "parse_instance",
]
