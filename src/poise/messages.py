"""The messages between the supervisor and its workers (``poise run --workers N``).

Each kind is a frozen dataclass; they travel pickled and length-prefixed over the link
(``poise.workers.Link``). A receiver dispatches with ``match`` ending in
``case _: assert_never(message)``, so that mypy proves every kind of the union is handled.

Supervisor to worker: ``Init`` once, first, then ``Update``s in the order the supervisor's
state changed. Worker to supervisor: ``Ready`` once serving, then a ``Report`` every second
and a last one when it exits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from poise.config.model import BackendConfig, Config

Snapshot = dict[str, Any]  # poise.dataplane.Snapshot (not imported: dataplane is heavier)


@dataclass(frozen=True, slots=True)
class GroupState:
    """One upstream's shared state, as the supervisor has it (in ``Sync`` and ``Init``)."""

    backends: tuple[BackendConfig, ...]
    reported: tuple[bool, ...]  # what the registry says, by backend index
    healthy: tuple[bool, ...]  # the active checks' verdicts
    admin: tuple[str, ...]  # operator states: enabled, drain, maint


# -- supervisor to worker -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Init:
    """A worker's first message: what it needs to start serving."""

    slot: int
    config: Config  # with discovered backends filled in
    fds: dict[str, list[int]]  # listening sockets by listener name
    level: str  # log level
    log_format: str  # "json" or "text"
    state: dict[str, GroupState]
    tickets: dict[str, dict[int, bytes]]  # TLS session ticket secrets by listener


@dataclass(frozen=True, slots=True)
class Members:
    """Membership of an upstream changed (registry, file or DNS source, admin API)."""

    group: str
    backends: tuple[BackendConfig, ...]
    reported: list[bool] | None
    initial: bool


@dataclass(frozen=True, slots=True)
class Health:
    """The active checks' verdicts for an upstream, by backend index."""

    group: str
    up: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class Passed:
    """An active probe passed (it may end a passive ejection begun before ``started``)."""

    group: str
    index: int
    started: float


@dataclass(frozen=True, slots=True)
class State:
    """An operator state of a backend: enabled, drain or maint."""

    group: str
    backend: str
    state: str


@dataclass(frozen=True, slots=True)
class Reload:
    """A new configuration (from the supervisor: with discovered backends filled in)."""

    config: Config


@dataclass(frozen=True, slots=True)
class Sync:
    """The whole shared state: after each reload."""

    state: dict[str, GroupState]


@dataclass(frozen=True, slots=True)
class Tickets:
    """TLS session ticket secrets by listener, at each rotation (``poise.tls.tickets``)."""

    secrets: dict[str, dict[int, bytes]]


# what a Server in the control role replicates (``Server.replicate``)
Replicated = Members | Health | Passed | State | Reload
# what a serving worker applies (``poise.workers.apply``)
Update = Replicated | Sync | Tickets
ToWorker = Init | Update


# -- worker to supervisor -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker serves."""


@dataclass(frozen=True, slots=True)
class Report:
    """The worker's ``poise.dataplane`` numbers."""

    snapshot: Snapshot


ToSupervisor = Ready | Report
