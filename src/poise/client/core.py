"""The pure half of the SDK: request bodies, reply parsing, policy views. No sockets, no loops.

Both the async and the sync clients build requests and read replies with these functions, so
the two cannot drift apart; the I/O halves only move bytes.

A :class:`ServiceView` is one service's instances at one registry revision, with a picker
built by :func:`poise.balancing.build` over them: the policy code the proxy runs. Like the
proxy, the picker is built over *every* HTTP instance and the caller skips the unusable ones
(``critical``, weight 0): a status flip does not remap a consistent-hash key space. Views are
swapped whole by the resolver when the registry reports a change; picking takes a lock only
because a sync resolver is read from many threads at once.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from poise.balancing import Load, build, new_load
from poise.balancing.keys import KeySource, extract
from poise.config.checks import Checker
from poise.config.load import _policy as _parse_policy  # the config's own policy validator
from poise.config.model import PolicyConfig
from poise.errors import (
    ConfigError,
    InvalidInstance,
    NotRegistered,
    RegistryError,
    RegistryUnreachable,
)
from poise.models import Backend, authority_of
from poise.registry.discovery import backends_of
from poise.registry.model import Instance, check_instance_id, check_service, parse_ttl

# seconds between tries while the registry cannot be reached: quick at first, then capped
BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)
EJECT = 5.0  # seconds an instance that refused a connection is tried only as a last resort
DEFAULT_WAIT = 30.0  # seconds per blocking query


def backoff(failures: int) -> float:
    return BACKOFF[min(max(failures, 1), len(BACKOFF)) - 1]


def default_id(service: str, port: int) -> str:
    return f"{service}-{socket.gethostname()}-{port}"


def headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class SpecFields(TypedDict, total=False):
    """The optional fields of a registration (``RegistrationSpec.make``'s keywords), taken
    as they are by ``register`` of both clients."""

    host: str
    ttl: str | float | None
    id: str | None
    weight: int
    tags: Iterable[str]
    meta: Mapping[str, str] | None
    zone: str
    scheme: str


def blocking_query(
    index: int | None, wait: float, timeout: float
) -> tuple[dict[str, str] | None, float]:
    """A listing's query parameters and timeout: with ``index``, a blocking query that
    returns once the service changed after that revision, or after ``wait`` seconds."""
    if index is None:
        return None, timeout
    return {"index": str(index), "wait": f"{wait:g}s"}, timeout + wait


def decode(
    status: int, content: bytes, what: str, url: str, reg: RegistrationSpec | None = None
) -> Any:
    """A registry API reply (``status``, body ``content``) to ``what`` (as the error says
    it): the decoded JSON when 2xx, else the matching error (``check_reply``)."""
    try:
        data = json.loads(content) if content else None
    except ValueError as exc:
        raise RegistryUnreachable(f"{what}: registry at {url}: {exc!r}") from exc
    return check_reply(status, data, what, reg)


def parse_services(data: Any) -> dict[str, int]:
    """``GET /v1/services`` -> instances by service name."""
    return {str(k): int(v) for k, v in dict(data["services"]).items()}


class WatchState:
    """A watch by blocking queries, the same for the async and the sync loop: the revision
    to wait after, the last instances seen and the failures in a row."""

    __slots__ = ("failures", "index", "last")

    def __init__(self) -> None:
        self.index: int | None = None
        self.last: tuple[Instance, ...] | None = None
        self.failures = 0

    def failed(self) -> float:
        """The registry did not answer: the seconds to wait before asking again."""
        self.index = None  # it may come back empty, its revisions starting again from 1
        self.failures += 1
        return backoff(self.failures)

    def answered(self, found: tuple[Instance, ...], index: int) -> bool:
        """The instances at revision ``index``: whether they changed (to yield them)."""
        self.failures = 0
        self.index = index
        if found == self.last:
            return False
        self.last = found
        return True


@dataclass(frozen=True, slots=True)
class RegistrationSpec:
    """What to register: the body of ``PUT /v1/services/{service}/instances/{id}``."""

    service: str
    id: str
    host: str
    port: int
    ttl: float | None
    weight: int = 1
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] | None = None
    zone: str = ""
    scheme: str = "http"

    @classmethod
    def make(
        cls,
        service: str,
        port: int,
        *,
        host: str = "127.0.0.1",
        ttl: str | float | None = "10s",
        id: str | None = None,
        weight: int = 1,
        tags: Iterable[str] = (),
        meta: Mapping[str, str] | None = None,
        zone: str = "",
        scheme: str = "http",
    ) -> RegistrationSpec:
        """Checked here, so a typo fails at the call site, not in a background task."""
        problems: list[str] = []
        seconds: float | None = None
        try:
            check_service(service)
        except InvalidInstance as exc:
            problems += exc.problems
        if id is not None or not problems:  # a bad service name makes a bad default id too
            try:
                check_instance_id(id or default_id(service, port))
            except InvalidInstance as exc:
                problems += exc.problems
        try:
            seconds = parse_ttl(ttl)
        except InvalidInstance as exc:
            problems += exc.problems
        if problems:
            raise InvalidInstance(problems)
        return cls(
            service, id or default_id(service, port), host, port, seconds, weight,
            tuple(tags), dict(meta or {}), zone, scheme,
        )  # fmt: skip

    @property
    def path(self) -> str:
        return f"/v1/services/{self.service}/instances/{self.id}"

    @property
    def interval(self) -> float:
        """Seconds between heartbeats: a third of the TTL, so two may be lost in a row."""
        return self.ttl / 3 if self.ttl is not None else DEFAULT_WAIT

    def body(self, status: str) -> dict[str, Any]:
        return {
            "host": self.host, "port": self.port, "scheme": self.scheme, "weight": self.weight,
            "tags": list(self.tags), "meta": dict(self.meta or {}), "zone": self.zone,
            "ttl": self.ttl, "status": status,
        }  # fmt: skip


def check_reply(status: int, data: Any, what: str, reg: RegistrationSpec | None = None) -> Any:
    """``data`` (the decoded JSON body) when ``status`` is 2xx, else the matching error."""
    if 200 <= status < 300:
        return data
    message = data.get("error", "") if isinstance(data, dict) else ""
    message = f"{what}: HTTP {status}" + (f": {message}" if message else "")
    if status == 400:
        problems = data.get("problems") if isinstance(data, dict) else None
        raise InvalidInstance(list(problems) if problems else [message])
    if status == 404 and reg is not None:
        raise NotRegistered(reg.service, reg.id)
    if status >= 500:
        raise RegistryUnreachable(message)
    raise RegistryError(message)


def parse_instances(data: Any) -> tuple[tuple[Instance, ...], int]:
    """``GET /v1/services/{service}`` -> (instances, revision)."""
    try:
        found = tuple(Instance.from_json(i) for i in data["instances"])
        return found, int(data["revision"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"unexpected reply from the registry: {exc!r}") from exc


def parse_policy(policy: str | Mapping[str, Any] | PolicyConfig) -> PolicyConfig:
    """A policy as the config file writes it (``"p2c"``, ``{"name": "consistent_hash", ...}``)."""
    if isinstance(policy, PolicyConfig):
        return policy
    c = Checker()
    parsed = _parse_policy(c, policy, "policy")
    if c.problems:
        raise ConfigError(c.problems)
    return parsed


def request_key(
    policy: PolicyConfig, target: bytes, header_pairs: Iterable[tuple[bytes, bytes]]
) -> bytes | None:
    """The hashing key of a request the SDK sends, as the proxy would extract it. ``ip`` has no
    meaning on the client side (it is always this process): no key, so the policy's
    ``default_key`` or fallback decides."""
    if policy.key is None:
        return None
    source = KeySource.parse(policy.key)
    if source.kind == "ip":
        return None
    flat: list[bytes] = []
    for name, value in header_pairs:
        flat += (name, b": ", value, b"\r\n")
    return extract(source, b"", target, flat)


class ServiceView:
    """One service at one revision: its instances, backends, picker and load."""

    __slots__ = (
        "_lock",
        "backends",
        "instances",
        "load",
        "picker",
        "revision",
        "service",
        "usable",
    )

    def __init__(
        self,
        service: str,
        instances: Sequence[Instance],
        revision: int,
        *,
        policy: PolicyConfig,
        rng: random.Random,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.instances = tuple(instances)
        self.revision = revision
        configs, fine = backends_of(self.instances)  # merged by address, http(s) only
        self.backends = tuple(
            Backend(authority_of(b.host, b.port), b.scheme, b.host, b.port, b.weight, i,
                    authority_of(b.host, b.port))
            for i, b in enumerate(configs)
        )  # fmt: skip
        # critical -> not fine; weight 0 -> "drain": registered, but sent nothing new
        self.usable = [ok and b.state == "enabled" for b, ok in zip(configs, fine, strict=True)]
        self.load: Load | None = new_load(policy, len(self.backends))
        self.picker = build(policy, self.backends, rng, self.load, now)
        self._lock = threading.Lock()

    def candidates(
        self, key: bytes | None, ejected: Mapping[str, float], now: float
    ) -> list[Backend]:
        """Usable backends: the policy's pick first (among those not recently refusing
        connections, if any), then the others from there round, those refusing last. The
        picker is asked for one pick only: its state moves as the backends it hands out are
        taken (see poise.balancing.base), so walking its whole order would take no turn."""
        usable = self.usable
        fresh_up = [
            ok and ejected.get(b.id, 0.0) <= now
            for b, ok in zip(self.backends, usable, strict=True)
        ]
        with self._lock:
            head = self.picker.pick(key, fresh_up, ())
            if head is None:
                head = self.picker.pick(key, usable, ())
        if head is None:
            return []
        n, at = len(self.backends), head.index
        ring = [self.backends[(at + k) % n] for k in range(1, n)]
        rest = [b for b in ring if usable[b.index]]
        fresh = [b for b in rest if ejected.get(b.id, 0.0) <= now]
        return [head, *fresh, *(b for b in rest if ejected.get(b.id, 0.0) > now)]

    def started(self, backend: Backend) -> None:
        if self.load is not None:
            with self._lock:
                self.load.started(backend.index)

    def finished(self, backend: Backend, latency: float, ok: bool, now: float) -> None:
        if self.load is not None:
            with self._lock:
                self.load.finished(backend.index, latency, ok, now)

    def __repr__(self) -> str:
        n = sum(self.usable)
        return f"ServiceView({self.service}, {n}/{len(self.backends)} usable, rev {self.revision})"
