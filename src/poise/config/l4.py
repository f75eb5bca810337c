"""Config for TCP (L4) listeners: parsing and the checks that span listeners and upstreams.

``load`` calls in here for listeners with ``"protocol": "tcp"``, for backend addresses
(``tcp://host:port`` and bare ``host:port`` are TCP backends) and, once everything is parsed,
for the cross-checks: HTTP routes need http:// backends; a TCP listener can only hash on the
client address, so its upstreams' policies (its own and its ``sni`` routes') must not need a
header, cookie or URI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from poise.config.checks import (
    Checker,
    check_cidrs,
    check_str,
    choice,
    int_in,
    key_path,
    positive_duration,
)
from poise.config.model import ListenerConfig, SniRouteConfig, TcpListenerConfig, UpstreamConfig
from poise.config.tls import check_sni_names
from poise.config.values import describe_type, parse_backend_url

__all__ = [
    "TCP_LISTENER_KEYS",
    "check_listener_upstreams",
    "check_probe_bytes",
    "listener_protocol",
    "parse_any_backend",
    "tcp_listener",
]

TCP_LISTENER_KEYS = (
    "protocol",
    "idle_timeout",
    "max_connections",
    "connect_timeout",
    "proxy_protocol",
    "accept_proxy",
    "sni",
)
_SNI_ROUTE_KEYS = ("names", "upstream")
_TCP_ONLY = TCP_LISTENER_KEYS[1:]
_BARE_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]+")
_PROBE_BYTES_MAX = 4096


def listener_protocol(c: Checker, obj: Mapping[str, object], path: str) -> str | None:
    """ "http" or "tcp"; None when invalid (reported), so nothing else is checked against a
    guess."""
    if "protocol" not in obj:
        protocol: str | None = "http"
    else:
        protocol = c.check(obj["protocol"], key_path(path, "protocol"), choice("http", "tcp"))
    if protocol == "http":
        for key in _TCP_ONLY:
            if key in obj:
                c.error(key_path(path, key), "applies only to listeners with protocol 'tcp'")
    return protocol


def _proxy_version(value: object) -> int:
    if value in (None, False, "none", "off"):
        return 0
    if value in (1, "v1", "1"):
        return 1
    if value in (2, "v2", "2"):
        return 2
    raise ValueError(f"must be 'v1', 'v2' or 'none', got {value!r}")


def tcp_listener(
    c: Checker, obj: Mapping[str, object], path: str, known: Sequence[str] | None
) -> TcpListenerConfig | None:
    if "routes" in obj:
        c.error(key_path(path, "routes"), "a TCP listener has no routes; name its 'upstream'")
    if "upstream" not in obj:
        c.error(key_path(path, "upstream"), "required but missing (the upstream to relay to)")
        return None
    upath = key_path(path, "upstream")
    upstream = c.check(obj["upstream"], upath, check_str)
    if upstream is None:
        return None
    if not _check_known(c, upstream, upath, known):
        return None
    default = TcpListenerConfig(upstream)
    return TcpListenerConfig(
        upstream=upstream,
        idle_timeout=c.field(obj, "idle_timeout", path, positive_duration, default.idle_timeout),
        max_connections=c.field(obj, "max_connections", path, int_in(0), default.max_connections),
        connect_timeout=c.field(obj, "connect_timeout", path, positive_duration, None),
        proxy_protocol=c.field(obj, "proxy_protocol", path, _proxy_version, 0),
        accept_proxy=c.field(obj, "accept_proxy", path, check_cidrs, ()),
        sni=_sni_routes(c, obj["sni"], key_path(path, "sni"), known) if "sni" in obj else (),
    )


def _check_known(c: Checker, upstream: str, path: str, known: Sequence[str] | None) -> bool:
    if known is not None and upstream not in known:
        c.error(
            path, f"unknown upstream {upstream!r} (known: {', '.join(sorted(known)) or 'none'})"
        )
        return False
    return True


def _sni_routes(
    c: Checker, value: object, path: str, known: Sequence[str] | None
) -> tuple[SniRouteConfig, ...]:
    """``[{"names": [...], "upstream": "x"}, ...]``: each name (exact or ``*.suffix``) routed
    once, to an upstream that exists."""
    routes: list[SniRouteConfig] = []
    seen: dict[str, int] = {}
    for j, item in enumerate(c.items(value, path)):
        rpath = f"{path}[{j}]"
        obj = c.mapping(item, rpath, _SNI_ROUTE_KEYS)
        if obj is None:
            continue
        names = c.required(obj, "names", rpath, check_sni_names)
        upath = key_path(rpath, "upstream")
        upstream = c.required(obj, "upstream", rpath, check_str)
        if upstream is not None and not _check_known(c, upstream, upath, known):
            upstream = None
        for name in names or ():
            if name in seen:
                c.error(
                    key_path(rpath, "names"), f"{name!r} is already routed by {path}[{seen[name]}]"
                )
            seen.setdefault(name, j)
        if names is not None and upstream is not None:
            routes.append(SniRouteConfig(names, upstream))
    return tuple(routes)


def parse_any_backend(value: str) -> tuple[str, str, int]:
    """``(scheme, host, port)``: ``tcp://host:port`` or bare ``host:port`` are TCP backends
    (port required); anything else must be an http:// URL."""
    if isinstance(value, str):
        lower = value.lower()
        if lower.startswith("tcp://"):
            _, host, port = parse_backend_url("http://" + value[6:])
            if not re.search(r":[0-9]+/?$", value):
                raise ValueError(f"a tcp:// backend needs a port: {value!r}")
            if value.endswith("/"):
                raise ValueError(f"a tcp:// backend has no path: {value!r}")
            return "tcp", host, port
        if "://" not in value and _BARE_RE.fullmatch(value):
            _, host, port = parse_backend_url("http://" + value)
            return "tcp", host, port
    return parse_backend_url(value)


def check_probe_bytes(value: object) -> bytes:
    """A TCP check's ``send``/``expect``: a string, sent as UTF-8 (JSON escapes such as
    ``\\r\\n`` and ``\\u0000`` give any byte below 0x80)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe_type(value)}")
    if not value:
        raise ValueError("must not be empty")
    raw = value.encode("utf-8")
    if len(raw) > _PROBE_BYTES_MAX:
        raise ValueError(f"at most {_PROBE_BYTES_MAX} bytes, got {len(raw)}")
    return raw


def _raw_index(raw: object, name: str) -> int | None:
    if not isinstance(raw, list):
        return None
    for i, item in enumerate(raw):
        if isinstance(item, Mapping) and item.get("name", f"listener{i}") == name:
            return i
    return None


def _check_tcp_policy(c: Checker, ucfg: UpstreamConfig, why: tuple[str, str]) -> None:
    """A TCP listener relays to ``ucfg``: its policy can hash on the client address only.
    ``why`` says which listener, in the words of each message."""
    ppath = f"upstreams.{ucfg.name}.policy"
    if ucfg.policy.name == "sticky":
        c.error(
            ppath,
            f"sticky needs HTTP cookies; {why[0]} (use consistent_hash or hash on the client "
            "address)",
        )
    elif ucfg.policy.key not in (None, "ip"):
        c.error(
            key_path(ppath, "key"),
            f"{ucfg.policy.key!r} cannot be read from a TCP connection ({why[1]}); use 'ip'",
        )


def check_listener_upstreams(
    c: Checker,
    raw_listeners: object,
    listeners: Sequence[ListenerConfig],
    upstreams: Mapping[str, UpstreamConfig],
) -> None:
    """HTTP routes need http:// backends; TCP listeners hash only on the client address."""
    reported: set[str] = set()
    for lc in listeners:
        i = _raw_index(raw_listeners, lc.name)
        lpath = f"listeners[{i}]" if i is not None else f"listeners.{lc.name}"
        if lc.tcp is not None:
            via = {
                lc.tcp.upstream: (
                    f"{lpath} ({lc.name!r}) is a TCP listener",
                    f"{lpath}, {lc.name!r}, is a TCP listener",
                )
            }
            for j, sni in enumerate(lc.tcp.sni):
                where = f"{lpath}.sni[{j}]"
                via.setdefault(
                    sni.upstream,
                    (
                        f"{where} routes TCP listener {lc.name!r} here",
                        f"{where}: TCP listener {lc.name!r} routes here",
                    ),
                )
            for name, why in via.items():
                ucfg = upstreams.get(name)
                if ucfg is not None:
                    _check_tcp_policy(c, ucfg, why)
            continue
        for j, route in enumerate(lc.routes):
            ucfg = upstreams.get(route.upstream)
            if ucfg is None:
                continue
            tcp = [k for k, b in enumerate(ucfg.backends) if b.scheme == "tcp"]
            if tcp and ucfg.name not in reported:
                reported.add(ucfg.name)
                where = f"{lpath}.routes[{j}]" if len(lc.routes) > 1 else lpath
                c.error(
                    f"upstreams.{ucfg.name}.backends[{tcp[0]}]",
                    f"{ucfg.backends[tcp[0]].url!r} is a TCP backend, but HTTP listener "
                    f"{lc.name!r} routes here ({where}); HTTP routes need http:// backends",
                )
