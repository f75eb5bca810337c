"""The ``registry`` section: which store holds the service registry, and its API listener.
Same conventions as ``load``: every problem reported with its dotted path."""

from __future__ import annotations

import os
import re

from poise.config.checks import (
    Checker,
    check_bool,
    check_str,
    choice,
    int_in,
    key_path,
    positive_duration,
)
from poise.config.model import AdminConfig, DnsConfig, RegistryConfig
from poise.config.values import describe_type, parse_listen

REGISTRY_KEYS = (
    "store",
    "path",
    "durable",
    "endpoints",
    "prefix",
    "node",
    "advertise",
    "node_ttl",
    "listen",
    "token",
    "read_token",
    "history",
)
STORES = ("memory", "sqlite", "etcd")
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def _listen(value: object) -> tuple[str, int] | None:
    if value is None or value is False:
        return None
    return parse_listen(value)


def _token(value: object) -> str | None:
    """A literal token, or ``{"env": "NAME"}`` to read it from the environment at load."""
    if value is None:
        return None
    if isinstance(value, dict):
        if set(value) != {"env"} or not isinstance(value["env"], str):
            raise ValueError('expected a string or {"env": "VARIABLE"}')
        token = os.environ.get(value["env"])
        if not token:
            raise ValueError(f"environment variable {value['env']} is not set or empty")
        return token
    token = check_str(value)
    if len(token) < 16:
        raise ValueError("a token must be at least 16 characters long")
    return token


def _endpoints(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"expected a URL or a non-empty list of URLs, got {describe_type(value)}")
    out = []
    for item in items:
        if not isinstance(item, str) or not item.startswith(("http://", "https://")):
            raise ValueError(f"{item!r} is not an http:// or https:// URL")
        out.append(item.rstrip("/"))
    return tuple(out)


def _prefix(value: object) -> str:
    text = check_str(value)
    if not text.startswith("/") or (text.endswith("/") and text != "/"):
        raise ValueError(f"expected a key prefix like '/poise', got {text!r}")
    return text


def _node(value: object) -> str:
    text = check_str(value)
    if not _NODE.fullmatch(text):
        raise ValueError(
            f"expected a node name (letters, digits, '.', '_', ':', '-'; 1-128), got {text!r}"
        )
    return text


def _advertise(value: object) -> str:
    text = check_str(value)
    if not text.startswith(("http://", "https://")) or len(text) < 10:
        raise ValueError(f"expected the http:// URL of this node's registry API, got {text!r}")
    return text.rstrip("/")


def _node_ttl(value: object) -> float:
    seconds = positive_duration(value)
    if not 2.0 <= seconds <= 3600.0:
        raise ValueError(f"must be between 2s (etcd's shortest lease) and 1h, got {value!r}")
    return seconds


def registry(c: Checker, value: object, path: str) -> RegistryConfig:
    if value is None:
        return RegistryConfig()
    obj = c.mapping(value, path, REGISTRY_KEYS)
    if obj is None:
        return RegistryConfig()
    d = RegistryConfig()
    store = c.field(obj, "store", path, choice(*STORES), d.store)
    if "path" in obj and store != "sqlite":
        c.error(key_path(path, "path"), f"only for store 'sqlite' (store is {store!r})")
    for key in ("endpoints", "prefix", "node", "advertise", "node_ttl"):
        if key in obj and store != "etcd":
            c.error(key_path(path, key), f"only for store 'etcd' (store is {store!r})")
    listen = d.listen
    if "listen" in obj:
        listen = c.check(obj["listen"], key_path(path, "listen"), _listen)
    return RegistryConfig(
        store=store,
        path=c.field(obj, "path", path, check_str, d.path),
        durable=c.field(obj, "durable", path, check_bool, d.durable),
        endpoints=c.field(obj, "endpoints", path, _endpoints, d.endpoints),
        prefix=c.field(obj, "prefix", path, _prefix, d.prefix),
        node=c.field(obj, "node", path, _node, d.node),
        advertise=c.field(obj, "advertise", path, _advertise, d.advertise),
        node_ttl=c.field(obj, "node_ttl", path, _node_ttl, d.node_ttl),
        listen=listen,
        token=c.field(obj, "token", path, _token, d.token),
        read_token=c.field(obj, "read_token", path, check_bool, d.read_token),
        history=c.field(obj, "history", path, int_in(100, 10_000_000), d.history),
    )


DNS_KEYS = ("name", "type", "port", "scheme", "refresh", "nameserver")


def _nameserver(value: object) -> tuple[str, int]:
    text = check_str(value)
    host, port = parse_listen(text if ":" in text.strip("[]") or "]:" in text else f"{text}:53")
    if not host:
        raise ValueError(f"expected an IP address with an optional port, got {text!r}")
    return host, port


def dns_source(c: Checker, value: object, path: str) -> DnsConfig | None:
    """``"users.internal"`` (A records, port 80) or an object with the options."""
    if isinstance(value, str):
        value = {"name": value}
    obj = c.mapping(value, path, DNS_KEYS)
    if obj is None:
        return None
    name = c.required(obj, "name", path, check_str)
    kind = c.field(obj, "type", path, choice("a", "srv"), "a").upper()
    if "port" in obj and kind == "SRV":
        c.error(key_path(path, "port"), "SRV records carry their own ports")
    if name is None:
        return None
    return DnsConfig(
        name=name,
        type=kind,
        port=c.field(obj, "port", path, int_in(1, 65535), 80),
        scheme=c.field(obj, "scheme", path, choice("http", "https"), "http"),
        refresh=c.field(obj, "refresh", path, positive_duration, 10.0),
        nameserver=c.field(obj, "nameserver", path, _nameserver, None),
    )


ADMIN_KEYS = ("listen", "token")


def admin(c: Checker, value: object, path: str) -> AdminConfig:
    """The ``admin`` section (its listener and token)."""
    obj = c.mapping(value if value is not None else {}, path, ADMIN_KEYS)
    if obj is None:
        return AdminConfig()
    d = AdminConfig()
    return AdminConfig(
        listen=c.field(obj, "listen", path, parse_listen, d.listen),
        token=c.field(obj, "token", path, _token, d.token),
    )
