"""What the registry knows: service instances, their status, and the events that change them.

Theory of operation
-------------------
An **instance** is one running copy of a service: an address (scheme, host, port), a weight,
tags, metadata and a zone. It is registered with an optional **TTL**: a heartbeat must come
within every TTL or the instance is removed (reason ``expired``); without a TTL it stays until
deregistered. A heartbeat may also set the instance's **status** (``passing``, ``warning``,
``critical``; only ``critical`` keeps traffic away).

Every change (register, modify, status change, deregister, expiry) gets the next
**revision** of the store, a number that only grows, and is an **event**. A plain heartbeat
that only renews the TTL changes nothing anyone routes on, so it is not an event: watchers are
not woken 20,000 times a second for nothing.

Everything here is pure: parsing and validation (every problem named by its field), JSON
forms. Stores persist and order; the server turns instances into backends.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from poise.errors import InvalidInstance

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
STATUSES = (PASSING, WARNING, CRITICAL)

PUT = "put"
DELETE = "delete"

# a service name is one DNS label-ish word: it appears in URLs (http://users/...) and paths
_SERVICE = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,62})")
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_SCHEMES = ("http", "https", "tcp")
# one label of a DNS name ('_' too: DNS allows it, and container names use it)
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
MAX_TTL = 24 * 3600.0
MIN_TTL = 0.1
_FIELDS = ("host", "address", "port", "scheme", "weight", "tags", "meta", "zone", "ttl", "status")


def _empty_meta() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Instance:
    service: str
    id: str
    host: str
    port: int
    scheme: str = "http"
    weight: int = 1
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=_empty_meta)
    zone: str = ""
    ttl: float | None = None  # seconds between heartbeats at most; None = no expiry
    status: str = PASSING
    revision: int = 0  # the store revision of its last change

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.id)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def same_registration(self, other: Instance) -> bool:
        """Equal in everything but the revision (re-registering it changes nothing)."""
        return replace(self, revision=other.revision) == other

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "id": self.id,
            "scheme": self.scheme,
            "host": self.host,
            "port": self.port,
            "url": self.url,
            "weight": self.weight,
            "tags": list(self.tags),
            "meta": dict(self.meta),
            "zone": self.zone,
            "ttl": self.ttl,
            "status": self.status,
            "revision": self.revision,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Instance:
        """The inverse of ``to_json`` for data this module wrote (stores); not for user input."""
        return cls(
            service=str(data["service"]),
            id=str(data["id"]),
            host=str(data["host"]),
            port=int(data["port"]),
            scheme=str(data.get("scheme", "http")),
            weight=int(data.get("weight", 1)),
            tags=tuple(str(t) for t in data.get("tags", ())),
            meta=MappingProxyType({str(k): str(v) for k, v in dict(data.get("meta", {})).items()}),
            zone=str(data.get("zone", "")),
            ttl=None if data.get("ttl") is None else float(data["ttl"]),
            status=str(data.get("status", PASSING)),
            revision=int(data.get("revision", 0)),
        )


@dataclass(frozen=True, slots=True)
class Event:
    revision: int
    kind: str  # PUT | DELETE
    service: str
    id: str
    instance: Instance | None = None  # the new state, for PUT
    reason: str = ""  # for DELETE: "deregistered" | "expired"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "revision": self.revision,
            "type": self.kind,
            "service": self.service,
            "id": self.id,
        }
        if self.instance is not None:
            out["instance"] = self.instance.to_json()
        if self.reason:
            out["reason"] = self.reason
        return out


def check_service(name: object, where: str = "service") -> str:
    return _check_name(
        name, where, _SERVICE, "a service name (lower-case letters, digits, '-', '_'; "
        "1-63 characters, starting with a letter or digit)",
    )  # fmt: skip


def check_instance_id(value: object, where: str = "id") -> str:
    return _check_name(
        value, where, _INSTANCE, "an instance id (letters, digits, '.', '_', ':', '@', '-'; "
        "1-128 characters, starting with a letter or digit)",
    )  # fmt: skip


def _check_name(value: object, where: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInstance([f"{where}: {value!r} is not {what}"])
    return value


def parse_ttl(value: object, where: str = "ttl") -> float | None:
    """``10``, ``"10s"``, ``"500ms"``, ``"1m"`` -> seconds; None/absent -> no TTL."""
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*", value)
        if m:
            seconds = (
                float(m.group(1)) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
            )
    if seconds is None or not math.isfinite(seconds):
        raise InvalidInstance([f'{where}: {value!r} is not a duration (e.g. 10, "10s", "500ms")'])
    if not MIN_TTL <= seconds <= MAX_TTL:
        raise InvalidInstance([f"{where}: {value!r} must be between 100ms and 24h"])
    return seconds


def parse_instance(service: object, instance_id: object, body: object) -> Instance:
    """Validate a registration (the JSON body of a register call) into an Instance.

    Raises InvalidInstance listing every problem, each with its field name."""
    problems: list[str] = []

    def attempt(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except InvalidInstance as exc:
            problems.extend(exc.problems)
            return None

    name = attempt(check_service, service)
    iid = attempt(check_instance_id, instance_id)
    if not isinstance(body, Mapping):
        raise InvalidInstance([*problems, "body: expected a JSON object"])
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        problems.append(f"{', '.join(unknown)}: unknown field (known: {', '.join(_FIELDS)})")

    scheme = body.get("scheme", "http")
    if scheme not in _SCHEMES:
        problems.append(f"scheme: {scheme!r} is not one of {', '.join(_SCHEMES)}")
        scheme = "http"
    host = body.get("host", body.get("address"))
    if "host" in body and "address" in body:
        problems.append("address: give host or address, not both")
    checked = check_host(host)
    if checked is None:
        hint = " (the port goes in port)" if isinstance(host, str) and _has_port(host) else ""
        problems.append(
            f"host: {host!r} is not a DNS name (labels of 1-63 letters, digits, '-', '_'; "
            f"at most 253 characters), an IPv4 address or an IPv6 address{hint}"
        )
        checked = ""
    host = checked
    if "port" not in body:  # no default: 80 for a service on 8080 routes to nothing
        problems.append("port: required (1-65535)")
        port = 0
    else:
        port = body["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            problems.append(f"port: {port!r} is not a port number (1-65535)")
            port = 0
    weight = body.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1000:
        problems.append(f"weight: {weight!r} is not an integer from 0 to 1000")
        weight = 1
    tags = body.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        problems.append("tags: expected a list of non-empty strings")
        tags = []
    meta = body.get("meta", {})
    if not isinstance(meta, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        problems.append("meta: expected an object of string values")
        meta = {}
    zone = body.get("zone", "")
    if not isinstance(zone, str):
        problems.append(f"zone: {zone!r} is not a string")
        zone = ""
    ttl = attempt(parse_ttl, body.get("ttl"))
    status = body.get("status", PASSING)
    if status not in STATUSES:
        problems.append(f"status: {status!r} is not one of {', '.join(STATUSES)}")
        status = PASSING
    if problems:
        raise InvalidInstance(problems)
    return Instance(
        service=name,
        id=iid,
        host=host,
        port=port,
        scheme=scheme,
        weight=weight,
        tags=tuple(tags),
        meta=MappingProxyType(dict(meta)),
        zone=zone,
        ttl=ttl,
        status=status,
    )


def check_host(value: object) -> str | None:
    """``value`` as an instance host (an IPv6 address without brackets), or None when it is
    not a DNS name (labels of at most 63 characters, 253 in all, a trailing dot allowed, the
    last label not all digits), an IPv4 address or an IPv6 address (``[...]`` allowed)."""
    if not isinstance(value, str):
        return None
    text = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if ":" in text:
        try:
            return str(ipaddress.IPv6Address(text)) if "%" not in text else None
        except ValueError:
            return None
    if text is not value:
        return None  # brackets hold only IPv6 addresses
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    if labels[-1].isdigit():  # dotted digits are an IPv4 address or nothing (no TLD is numeric)
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            return None
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return text


def _has_port(host: str) -> bool:
    head, sep, tail = host.rpartition(":")
    return bool(sep) and tail.isdigit() and check_host(head) is not None


def check_status(value: object, where: str = "status") -> str:
    if value not in STATUSES:
        raise InvalidInstance([f"{where}: {value!r} is not one of {', '.join(STATUSES)}"])
    return str(value)
