"""Build a :class:`Config` from a file or a decoded document, reporting every problem at once.

Two document shapes are accepted: the seed format (``port``/``servers``/``healthCheckInterval``)
so existing deployments keep working, and the full format (``listeners``/``upstreams``/...).
Loading only reads the file: no sockets, no logging setup.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

from poise.balancing.names import (
    ALGORITHM_NAMES,
    ALIAS_OPTIONS,
    CANONICAL,
    KEYED,
    POLICIES,
    WITH_FALLBACK,
)
from poise.config.checks import (
    Checker,
    check_balance_factor,
    check_bool,
    check_cidrs,
    check_cookie_name,
    check_host_header,
    check_key_source,
    check_method,
    check_name,
    check_positive_number,
    check_secret,
    check_str,
    check_url_path,
    check_weight,
    choice,
    int_in,
    key_path,
    positive_duration,
)
from poise.config.l4 import (
    TCP_LISTENER_KEYS,
    check_listener_upstreams,
    check_probe_bytes,
    listener_protocol,
    parse_any_backend,
    tcp_listener,
)
from poise.config.model import (
    AccessLogConfig,
    BackendConfig,
    Config,
    HealthCheckConfig,
    Http2Config,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    PolicyConfig,
    PoolConfig,
    ProxyConfig,
    RegistryConfig,
    RouteConfig,
    TimeoutConfig,
    UpstreamConfig,
)
from poise.config.registry import admin, dns_source, registry
from poise.config.resilience import (
    check_backend_state,
    check_fraction,
    check_percent,
    check_probe_headers,
    check_regex,
    non_negative_duration,
    passive,
    retry,
    upstream_limits,
)
from poise.config.tls import listener_tls, redirect_https, upstream_tls
from poise.config.values import (
    describe_type,
    normalize_route_host,
    parse_backend_url,
    parse_duration,
    parse_listen,
    parse_status_range,
)
from poise.errors import ConfigError, InvalidInstance
from poise.registry.model import check_service

__all__ = [
    "load_config",
    "parse_backend_url",
    "parse_config",
    "parse_duration",
    "parse_listen",
]

_SEED_KEYS = ("port", "servers", "healthCheckInterval")
_FULL_KEYS = ("listeners", "upstreams")
_SHARED_KEYS = ("timeouts", "proxy", "limits", "log", "registry", "admin")
_LISTENER_KEYS = (
    "name",
    "listen",
    "routes",
    "upstream",
    "tls",
    "redirect_https",
    "http2",
    *TCP_LISTENER_KEYS,
)
_HTTP2_KEYS = (
    "enabled",
    "max_concurrent_streams",
    "initial_window_size",
    "max_frame_size",
    "max_header_list_size",
)
_ROUTE_KEYS = ("host", "path", "upstream")
_UPSTREAM_KEYS = (
    "backends",
    "service",
    "file",
    "dns",
    "policy",
    "health_check",
    "pool",
    "passive",
    "retry",
    "limits",
    "panic_threshold",
    "slow_start",
    "tls",
    "protocol",
)
_BACKEND_KEYS = ("url", "weight", "state")
_HEALTH_KEYS = (
    "enabled",
    "type",
    "method",
    "path",
    "host",
    "expected_status",
    "interval",
    "timeout",
    "rise",
    "fall",
    "headers",
    "body",
    "port",
    "jitter",
    "unhealthy_interval",
    "history",
    "send",
    "expect",
    "service",
)
_POOL_KEYS = ("max_idle", "idle_timeout")
_TIMEOUT_KEYS = (
    "client_header",
    "client_idle",
    "client_body",
    "upstream_connect",
    "upstream_response",
    "drain",
    "client_send",
    "tunnel_idle",
    "drain_idle",
)
_PROXY_KEYS = ("x_forwarded", "x_forwarded_server", "trusted_proxies", "forwarded", "via")
_LIMIT_KEYS = (
    "max_header_bytes",
    "max_headers",
    "max_target",
    "max_body_size",
    "max_connections",
    "min_body_rate",
)
_LOG_KEYS = ("level", "format", "access")
_ACCESS_KEYS = ("path", "format", "sample")

_POLICY_KEYS = (
    "name",
    "key",
    "default_key",
    "fallback",
    "algorithm",
    "balance_factor",
    "bias",
    "cookie",
    "secret",
)
_AVAILABLE_POLICIES = ", ".join(POLICIES)


def _seconds(value: float) -> str:
    return f"{value:g}s"


def parse_config(data: object, *, source: str | None = None) -> Config:
    """Validate a decoded document and build the :class:`Config`.

    Raises :class:`ConfigError` listing every problem found, each prefixed by its dotted path.
    """
    c = Checker()
    config = _document(c, data, source)
    if c.problems or config is None:
        raise ConfigError(c.problems or ["top level: invalid configuration"], source)
    if c.warnings:
        config = dataclasses.replace(config, warnings=tuple(c.warnings))
    return config


def _document(c: Checker, data: object, source: str | None) -> Config | None:
    if data is None or (isinstance(data, Mapping) and not data):
        c.error("", "the configuration is empty")
        return None
    if not isinstance(data, Mapping):
        c.error("", f"expected an object, got {describe_type(data)}")
        return None
    seed = [k for k in _SEED_KEYS if k in data]
    full = [k for k in _FULL_KEYS if k in data]
    if seed and full:
        c.error(
            "",
            "cannot mix the seed format (port, servers, healthCheckInterval) with the full "
            f"format (listeners, upstreams); found {', '.join(map(repr, seed + full))}",
        )
        return None
    allowed = (*_SEED_KEYS, *_SHARED_KEYS) if seed else (*_FULL_KEYS, *_SHARED_KEYS)
    doc = c.mapping(data, "", allowed)
    if doc is None:
        return None
    if seed:
        listeners, upstreams = _seed(c, doc)
    else:
        listeners, upstreams = _full(c, doc)
    return Config(
        listeners=listeners,
        upstreams=MappingProxyType(upstreams),
        timeouts=_timeouts(c, doc.get("timeouts"), "timeouts"),
        proxy=_proxy(c, doc.get("proxy"), "proxy"),
        limits=_limits(c, doc.get("limits"), "limits"),
        log=_log(c, doc.get("log"), "log"),
        registry=_registry_section(c, doc, upstreams),
        admin=admin(c, doc["admin"], "admin") if "admin" in doc else None,
        source=source,
    )


def _registry_section(
    c: Checker, doc: Mapping[str, object], upstreams: Mapping[str, UpstreamConfig]
) -> RegistryConfig | None:
    """The registry, when configured or needed (an upstream names a service)."""
    if "registry" in doc or any(u.service for u in upstreams.values()):
        return registry(c, doc.get("registry"), "registry")
    return None


def check_service_name(value: object) -> str:
    try:
        return check_service(value, "service")
    except InvalidInstance as exc:
        raise ValueError(exc.problems[0].split(": ", 1)[1]) from exc


def _seed(
    c: Checker, doc: Mapping[str, object]
) -> tuple[tuple[ListenerConfig, ...], dict[str, UpstreamConfig]]:
    """The seed's single listener and upstream, both named "default"."""
    host, port = c.required(doc, "port", "", parse_listen) or ("", 0)
    backends = _backends(c, doc["servers"], "servers") if "servers" in doc else ()
    if "servers" not in doc:
        c.error("servers", "required but missing")
    interval = c.field(doc, "healthCheckInterval", "", positive_duration, 2.0)
    health = HealthCheckConfig(interval=interval, timeout=min(1.0, interval))
    upstream = UpstreamConfig(name="default", backends=backends, health_check=health)
    listener = ListenerConfig("default", host, port, (RouteConfig(upstream="default"),))
    return (listener,), {"default": upstream}


def _full(
    c: Checker, doc: Mapping[str, object]
) -> tuple[tuple[ListenerConfig, ...], dict[str, UpstreamConfig]]:
    raw_upstreams = doc.get("upstreams")
    # Names are collected up front so references are checked even when an upstream is broken;
    # None means the section itself is unusable, and every reference would be a false alarm.
    known: list[str] | None = None
    if isinstance(raw_upstreams, Mapping) and raw_upstreams:
        known = [k for k in raw_upstreams if isinstance(k, str)]
    listeners: tuple[ListenerConfig, ...] = ()
    upstreams: dict[str, UpstreamConfig] = {}
    for key in doc:  # document order, so problems read top to bottom
        if key == "listeners":
            listeners = _listeners(c, doc[key], "listeners", known)
        elif key == "upstreams":
            upstreams = _upstreams(c, doc[key], "upstreams")
    for key in _FULL_KEYS:
        if key not in doc:
            c.error(key, "required but missing")
    check_listener_upstreams(c, doc.get("listeners"), listeners, upstreams)
    return listeners, upstreams


def _upstreams(c: Checker, value: object, path: str) -> dict[str, UpstreamConfig]:
    if not isinstance(value, Mapping):
        c.error(
            path,
            f"expected an object mapping upstream names to upstreams, got {describe_type(value)}",
        )
        return {}
    if not value:
        c.error(path, "must define at least one upstream")
    result: dict[str, UpstreamConfig] = {}
    for name, raw in value.items():
        if not isinstance(name, str):
            c.error(path, f"upstream name {name!r} is not a string")
            continue
        upath = key_path(path, name)
        if c.check(name, upath, check_name) is None:
            continue
        upstream = _upstream(c, name, raw, upath)
        if upstream is not None:
            result[name] = upstream
    return result


def _upstream(c: Checker, name: str, value: object, path: str) -> UpstreamConfig | None:
    obj = c.mapping(value, path, _UPSTREAM_KEYS)
    if obj is None:
        return None
    backends: tuple[BackendConfig, ...] = ()
    service = file = dns = None
    sources = [k for k in ("backends", "service", "file", "dns") if k in obj]
    if len(sources) > 1:
        c.error(path, f"give one of backends, service, file or dns, not {' and '.join(sources)}")
    if "service" in obj:
        service = c.check(obj["service"], key_path(path, "service"), check_service_name)
    if "file" in obj:
        file = c.check(obj["file"], key_path(path, "file"), check_str)
    if "dns" in obj:
        dns = dns_source(c, obj["dns"], key_path(path, "dns"))
    if "backends" in obj:
        backends = _backends(c, obj["backends"], key_path(path, "backends"), tcp=True)
    elif not sources:
        c.error(key_path(path, "backends"), "required but missing (or a service, file or dns)")
    protocol = c.field(obj, "protocol", path, choice("http1", "h2", "grpc"), "http1")
    if protocol != "http1" and any(b.scheme == "tcp" for b in backends):
        c.error(key_path(path, "protocol"), f"{protocol!r} needs http:// or https:// backends")
    # an upstream of tcp:// backends is checked by connecting, unless told otherwise; a
    # gRPC one by grpc.health.v1.Health/Check
    check_type = "tcp" if backends and all(b.scheme == "tcp" for b in backends) else "http"
    if protocol == "grpc":
        check_type = "grpc"
    return UpstreamConfig(
        protocol=protocol,
        service=service,
        file=file,
        dns=dns,
        name=name,
        backends=backends,
        policy=_policy(c, obj["policy"], key_path(path, "policy"))
        if "policy" in obj
        else PolicyConfig(),
        health_check=_health_check(
            c, obj.get("health_check"), key_path(path, "health_check"), check_type
        ),
        pool=_pool(c, obj.get("pool"), key_path(path, "pool")),
        passive=passive(c, obj.get("passive"), key_path(path, "passive")),
        retry=retry(c, obj.get("retry"), key_path(path, "retry")),
        limits=upstream_limits(c, obj.get("limits"), key_path(path, "limits")),
        panic_threshold=c.field(obj, "panic_threshold", path, check_percent, 0),
        slow_start=c.field(obj, "slow_start", path, non_negative_duration, 0.0),
        tls=upstream_tls(c, obj["tls"], key_path(path, "tls"), backends) if "tls" in obj else None,
    )


def _backends(
    c: Checker, value: object, path: str, *, tcp: bool = False
) -> tuple[BackendConfig, ...]:
    result: list[BackendConfig] = []
    seen: dict[tuple[str, str, int], int] = {}
    for i, item in enumerate(c.items(value, path)):
        ipath = f"{path}[{i}]"
        url_path, weight, state = ipath, 1, "enabled"
        if isinstance(item, Mapping):
            obj = c.mapping(item, ipath, _BACKEND_KEYS)
            if obj is None:
                continue
            url_path = key_path(ipath, "url")
            url = c.required(obj, "url", ipath, check_str)
            weight = c.field(obj, "weight", ipath, check_weight, 1)
            state = c.field(obj, "state", ipath, check_backend_state, "enabled")
        elif isinstance(item, str):
            url = item
        else:
            c.error(
                ipath, f"expected a URL string or an object with 'url', got {describe_type(item)}"
            )
            continue
        if url is None:
            continue
        parsed = c.check(url, url_path, parse_any_backend if tcp else parse_backend_url)
        if parsed is None:
            continue
        if parsed in seen:
            c.error(url_path, f"duplicate backend {url!r} (same address as {path}[{seen[parsed]}])")
            continue
        seen[parsed] = i
        scheme, host, port = parsed
        result.append(BackendConfig(url, scheme, host, port, weight, state))
    return tuple(result)


def _policy_options(c: Checker, value: object, path: str) -> tuple[str, dict[str, object]] | None:
    """The canonical name of the policy ``value`` names, and its options (those its alias
    implies, then those written); None (reported) when there is no known name."""
    obj: Mapping[str, object] | None = None
    if isinstance(value, Mapping):
        obj = c.mapping(value, path, _POLICY_KEYS)
        name = c.required(obj, "name", path, check_str) if obj is not None else None
    elif isinstance(value, str):
        name = value
    else:
        c.error(
            path, f"expected a policy name or an object with 'name', got {describe_type(value)}"
        )
        name = None
    if name is None:
        return None
    alias = name.lower().replace("-", "_")
    canonical = CANONICAL.get(alias)
    if canonical is None:
        c.error(
            key_path(path, "name"), f"unknown policy {name!r} (available: {_AVAILABLE_POLICIES})"
        )
        return None
    options: dict[str, object] = dict(ALIAS_OPTIONS.get(alias, {}))
    if obj is not None:
        options.update({k: v for k, v in obj.items() if k != "name"})
    return canonical, options


def _policy(c: Checker, value: object, path: str) -> PolicyConfig:
    """A name, or an object with a name and the options that policy takes."""
    named = _policy_options(c, value, path)
    if named is None:
        return PolicyConfig()
    canonical, options = named
    keyed = canonical in KEYED

    def only_for(option: str, allowed: bool, which: str) -> bool:
        if option in options and not allowed:
            c.error(key_path(path, option), f"applies only to {which}, not to {canonical!r}")
            return False
        return option in options

    key = None
    if only_for("key", keyed, "hash and consistent_hash"):
        key = c.check(options["key"], key_path(path, "key"), check_key_source)
    elif keyed:
        key = "ip"
    default_key = None
    if only_for("default_key", keyed, "hash and consistent_hash"):
        default_key = c.check(options["default_key"], key_path(path, "default_key"), check_str)
    fallback = "round_robin"
    if only_for("fallback", canonical in WITH_FALLBACK, "hash, consistent_hash and sticky"):
        raw = c.check(options["fallback"], key_path(path, "fallback"), check_str)
        fb = CANONICAL.get(raw.lower().replace("-", "_")) if raw is not None else None
        if raw is not None and (fb is None or fb in WITH_FALLBACK):
            keyless = ", ".join(n for n in POLICIES if n not in WITH_FALLBACK)
            c.error(key_path(path, "fallback"), f"must be a policy without a key ({keyless})")
        elif fb is not None:
            fallback = fb
    algorithm = "ring"
    if only_for("algorithm", canonical == "consistent_hash", "consistent_hash"):
        algo = c.check(options["algorithm"], key_path(path, "algorithm"),
                       choice(*ALGORITHM_NAMES))  # fmt: skip
        algorithm = algo or "ring"
    factor = None
    if only_for("balance_factor", canonical == "consistent_hash", "consistent_hash"):
        factor = c.check(options["balance_factor"], key_path(path, "balance_factor"),
                         check_balance_factor)  # fmt: skip
    bias = 1.0
    if only_for("bias", canonical == "p2c", "p2c"):
        bias = c.check(options["bias"], key_path(path, "bias"), check_positive_number) or 1.0
    cookie = "poise_sticky"
    if only_for("cookie", canonical == "sticky", "sticky"):
        cookie = c.check(options["cookie"], key_path(path, "cookie"), check_cookie_name) or cookie
    secret = None
    if only_for("secret", canonical == "sticky", "sticky"):
        secret = c.check(options["secret"], key_path(path, "secret"), check_secret)
    if canonical == "sticky":
        key = f"cookie:{cookie}"
    return PolicyConfig(
        name=canonical, key=key, default_key=default_key, fallback=fallback,
        algorithm=algorithm, balance_factor=factor, bias=bias, cookie=cookie, secret=secret,
    )  # fmt: skip


def _expected_status(c: Checker, value: object, path: str) -> tuple[tuple[int, int], ...] | None:
    if not isinstance(value, list | tuple):
        single = c.check(value, path, parse_status_range)
        return None if single is None else (single,)
    ranges = [c.check(item, f"{path}[{i}]", parse_status_range) for i, item in enumerate(value)]
    if not value:
        c.error(path, "must not be empty")
    if not value or None in ranges:
        return None
    return tuple(r for r in ranges if r is not None)


def _health_check(
    c: Checker, value: object, path: str, check_type: str = "http"
) -> HealthCheckConfig:
    default = HealthCheckConfig(type=check_type)
    if value is None:
        return default
    obj = c.mapping(value, path, _HEALTH_KEYS)
    if obj is None:
        return default
    enabled = c.field(obj, "enabled", path, check_bool, default.enabled)
    kind = c.field(obj, "type", path, choice("http", "tcp", "grpc"), default.type)
    if kind == "tcp":
        for key in ("method", "path", "host", "expected_status", "headers", "body"):
            if key in obj:
                c.error(key_path(path, key), "applies only to http checks, not to type 'tcp'")
    else:
        for key in ("send", "expect"):
            if key in obj:
                c.error(key_path(path, key), f"applies only to tcp checks, not to type {kind!r}")
    if kind == "grpc":  # (it asks grpc.health.v1.Health/Check; the path is that)
        for key in ("method", "path", "expected_status", "body"):
            if key in obj:
                c.error(key_path(path, key), "applies only to http checks, not to type 'grpc'")
    elif "service" in obj:
        c.error(key_path(path, "service"), f"applies only to grpc checks, not to type {kind!r}")
    method = c.field(obj, "method", path, check_method, default.method)
    url_path = c.field(obj, "path", path, check_url_path, default.path)
    host = c.field(obj, "host", path, check_host_header, None)
    expected = default.expected_status
    if "expected_status" in obj:
        status_path = key_path(path, "expected_status")
        expected = _expected_status(c, obj["expected_status"], status_path) or expected
    interval = c.field(obj, "interval", path, positive_duration, None)
    timeout = c.field(obj, "timeout", path, positive_duration, None)
    if interval is not None and timeout is not None and timeout > interval:
        c.error(
            key_path(path, "timeout"),
            f"must not be longer than interval ({_seconds(interval)}), got {_seconds(timeout)}",
        )
    interval = default.interval if interval is None else interval
    return HealthCheckConfig(
        enabled=enabled,
        type=kind,
        method=method,
        path=url_path,
        host=host,
        expected_status=expected,
        interval=interval,
        # A short interval alone must not trip the timeout <= interval rule via the default.
        timeout=min(default.timeout, interval) if timeout is None else timeout,
        rise=c.field(obj, "rise", path, int_in(1), default.rise),
        fall=c.field(obj, "fall", path, int_in(1), default.fall),
        headers=c.field(obj, "headers", path, check_probe_headers, ()),
        body=c.field(obj, "body", path, check_regex, None),
        port=c.field(obj, "port", path, int_in(1, 65535), None),
        jitter=c.field(obj, "jitter", path, check_fraction, default.jitter),
        unhealthy_interval=c.field(obj, "unhealthy_interval", path, positive_duration, None),
        history=c.field(obj, "history", path, int_in(1, 1000), default.history),
        send=c.field(obj, "send", path, check_probe_bytes, None),
        expect=c.field(obj, "expect", path, check_probe_bytes, None),
        service=c.field(obj, "service", path, check_str, ""),
    )


def _pool(c: Checker, value: object, path: str) -> PoolConfig:
    default = PoolConfig()
    obj = c.mapping(value, path, _POOL_KEYS) if value is not None else None
    if obj is None:
        return default
    return PoolConfig(
        max_idle=c.field(obj, "max_idle", path, int_in(0), default.max_idle),
        idle_timeout=c.field(obj, "idle_timeout", path, positive_duration, default.idle_timeout),
    )


def _listeners(
    c: Checker, value: object, path: str, known: list[str] | None
) -> tuple[ListenerConfig, ...]:
    result: list[tuple[int, ListenerConfig]] = []
    names: dict[str, int] = {}
    for i, item in enumerate(c.items(value, path)):
        lpath = f"{path}[{i}]"
        obj = c.mapping(item, lpath, _LISTENER_KEYS)
        if obj is None:
            continue
        name = c.field(obj, "name", lpath, check_name, f"listener{i}")
        if name in names:
            c.error(
                key_path(lpath, "name"),
                f"duplicate listener name {name!r} (also {path}[{names[name]}])",
            )
        names.setdefault(name, i)
        address = c.required(obj, "listen", lpath, parse_listen)
        protocol = listener_protocol(c, obj, lpath)
        tcp = tcp_listener(c, obj, lpath, known) if protocol == "tcp" else None
        tls = redirect = None
        routes: tuple[RouteConfig, ...] = ()
        http2: Http2Config | None = None
        if tcp is not None:
            for key in ("tls", "redirect_https", "http2"):
                if key in obj:
                    c.error(key_path(lpath, key), "applies only to HTTP listeners, not 'tcp'")
        elif protocol == "http":
            tls = listener_tls(c, obj["tls"], key_path(lpath, "tls")) if "tls" in obj else None
            if "redirect_https" in obj:
                redirect = redirect_https(
                    c, obj["redirect_https"], key_path(lpath, "redirect_https")
                )
                for key in ("routes", "upstream", "tls", "http2"):
                    if key in obj:
                        c.error(key_path(lpath, key), "a redirect_https listener only redirects")
            else:
                routes = _listener_routes(c, obj, lpath, known)
                http2 = _http2(c, obj.get("http2"), key_path(lpath, "http2"), tls is not None)
                if http2 is not None and tls is not None:
                    tls = dataclasses.replace(tls, alpn=("h2", "http/1.1"))
        if address is not None and protocol is not None and (tcp or protocol == "http"):
            listener = ListenerConfig(
                name, address[0], address[1], routes, tls, redirect, protocol, tcp, http2
            )
            result.append((i, listener))
    _check_bind_conflicts(c, result, path)
    return tuple(listener for _, listener in result)


def _http2(c: Checker, value: object, path: str, https: bool) -> Http2Config | None:
    """A listener's ``http2``: true, false, or a mapping of limits (``enabled`` too).
    Absent: on for HTTPS listeners (offered by ALPN beside http/1.1), off for plain ones
    (where it means HTTP/2 with prior knowledge, h2c, beside HTTP/1.1 on the same port)."""
    if value is None:
        return Http2Config() if https else None
    if isinstance(value, bool):
        return Http2Config() if value else None
    obj = c.mapping(value, path, _HTTP2_KEYS)
    if obj is None:
        return None
    d = Http2Config()
    enabled = c.field(obj, "enabled", path, check_bool, True)
    cfg = Http2Config(
        max_concurrent_streams=c.field(
            obj, "max_concurrent_streams", path, int_in(1, 10_000), d.max_concurrent_streams
        ),
        initial_window_size=c.field(
            obj, "initial_window_size", path, int_in(1024, 2**31 - 1), d.initial_window_size
        ),
        max_frame_size=c.field(obj, "max_frame_size", path, int_in(16384, 2**24 - 1),
                               d.max_frame_size),
        max_header_list_size=c.field(
            obj, "max_header_list_size", path, int_in(1024, 16 * 2**20), d.max_header_list_size
        ),
    )  # fmt: skip
    return cfg if enabled else None


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_bind_conflicts(
    c: Checker, listeners: Iterable[tuple[int, ListenerConfig]], path: str
) -> None:
    bound: list[tuple[int, ListenerConfig]] = []
    for i, listener in listeners:
        for j, other in bound:
            # "" binds every interface, so it collides with any address on that port too.
            same_host = "" in (listener.host, other.host) or listener.host == other.host
            if listener.port != 0 and listener.port == other.port and same_host:
                c.error(
                    f"{path}[{i}].listen",
                    f"{_format_address(listener.host, listener.port)} conflicts with "
                    f"{path}[{j}] ({other.name!r}, {_format_address(other.host, other.port)})",
                )
                break
        bound.append((i, listener))


def _listener_routes(
    c: Checker, obj: Mapping[str, object], path: str, known: list[str] | None
) -> tuple[RouteConfig, ...]:
    if "routes" in obj and "upstream" in obj:
        c.error(
            path,
            "has both 'routes' and 'upstream'; use 'routes' for several routes, or "
            "'upstream' alone for one catch-all route",
        )
        return ()
    if "upstream" in obj:
        upstream = _upstream_ref(c, obj["upstream"], key_path(path, "upstream"), known)
        return () if upstream is None else (RouteConfig(upstream=upstream),)
    if "routes" not in obj:
        c.error(path, "needs 'routes' (a list) or 'upstream' (the name of an upstream)")
        return ()
    rpath = key_path(path, "routes")
    items = c.items(obj["routes"], rpath)
    routes = [_route(c, item, f"{rpath}[{i}]", known) for i, item in enumerate(items)]
    return tuple(r for r in routes if r is not None)


def _upstream_ref(c: Checker, value: object, path: str, known: list[str] | None) -> str | None:
    name = c.check(value, path, check_str)
    if name is None:
        return None
    if known is not None and name not in known:
        c.error(path, f"unknown upstream {name!r} (known: {', '.join(sorted(known)) or 'none'})")
        return None
    return name


def _route(c: Checker, value: object, path: str, known: list[str] | None) -> RouteConfig | None:
    obj = c.mapping(value, path, _ROUTE_KEYS)
    if obj is None:
        return None
    upstream = None
    if "upstream" in obj:
        upstream = _upstream_ref(c, obj["upstream"], key_path(path, "upstream"), known)
    else:
        c.error(key_path(path, "upstream"), "required but missing")
    hosts = _route_hosts(c, obj["host"], key_path(path, "host")) if "host" in obj else ()
    path_prefix = c.field(obj, "path", path, check_url_path, "/")
    if upstream is None:
        return None
    return RouteConfig(upstream=upstream, hosts=hosts, path_prefix=path_prefix)


def _route_hosts(c: Checker, value: object, path: str) -> tuple[str, ...]:
    def host(item: object) -> str:
        return normalize_route_host(check_str(item))

    if isinstance(value, list | tuple):
        if not value:
            c.error(path, "must not be empty (leave 'host' out to match any host)")
        found = [c.check(item, f"{path}[{i}]", host) for i, item in enumerate(value)]
    else:
        found = [c.check(value, path, host)]
    # dict.fromkeys: drop repeats ("A.example" and "a.example.") but keep the written order.
    return tuple(dict.fromkeys(h for h in found if h is not None))


def _timeouts(c: Checker, value: object, path: str) -> TimeoutConfig:
    default = TimeoutConfig()
    obj = c.mapping(value, path, _TIMEOUT_KEYS) if value is not None else None
    if obj is None:
        return default
    values = {
        key: c.field(obj, key, path, positive_duration, getattr(default, key))
        for key in _TIMEOUT_KEYS
    }
    return TimeoutConfig(**values)


def _proxy(c: Checker, value: object, path: str) -> ProxyConfig:
    default = ProxyConfig()
    obj = c.mapping(value, path, _PROXY_KEYS) if value is not None else None
    if obj is None:
        return default
    return ProxyConfig(
        x_forwarded=c.field(obj, "x_forwarded", path, check_bool, default.x_forwarded),
        x_forwarded_server=c.field(
            obj, "x_forwarded_server", path, check_bool, default.x_forwarded_server
        ),
        trusted_proxies=c.field(obj, "trusted_proxies", path, check_cidrs, ()),
        forwarded=c.field(obj, "forwarded", path, check_bool, default.forwarded),
        via=c.field(obj, "via", path, check_bool, default.via),
    )


def _limits(c: Checker, value: object, path: str) -> LimitsConfig:
    default = LimitsConfig()
    obj = c.mapping(value, path, _LIMIT_KEYS) if value is not None else None
    if obj is None:
        return default
    lowest = {"max_header_bytes": 1024, "max_headers": 1, "max_target": 16}
    values = {
        key: c.field(obj, key, path, int_in(lowest.get(key, 0)), getattr(default, key))
        for key in _LIMIT_KEYS
    }
    return LimitsConfig(**values)


def _log(c: Checker, value: object, path: str) -> LogConfig:
    default = LogConfig()
    obj = c.mapping(value, path, _LOG_KEYS) if value is not None else None
    if obj is None:
        return default
    return LogConfig(
        level=c.field(obj, "level", path, choice("debug", "info", "warning", "error"), "info"),
        format=c.field(obj, "format", path, choice("text", "json"), "text"),
        access=_access_log(c, obj["access"], key_path(path, "access")) if "access" in obj else None,
    )


def _sample(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"expected a share above 0 and at most 1, got {value!r}")
    return float(value)


def _access_log(c: Checker, value: object, path: str) -> AccessLogConfig | None:
    """``true`` (JSON lines to standard output), ``false``, or an object."""
    if value is False:
        return None
    if value is True:
        return AccessLogConfig()
    obj = c.mapping(value, path, _ACCESS_KEYS)
    if obj is None:
        return None
    return AccessLogConfig(
        path=c.field(obj, "path", path, check_str, "-"),
        format=c.field(obj, "format", path, choice("json", "combined"), "json"),
        sample=c.field(obj, "sample", path, _sample, 1.0),
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a configuration file; the decoder is chosen by extension.

    ``.json``, ``.toml``, ``.yaml``/``.yml``; anything else is read as JSON. Every failure,
    including an unreadable or undecodable file, is raised as :class:`ConfigError`.
    """
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([f"cannot read configuration file: {reason}"], source) from exc
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate the BOM some Windows editors write
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text (bad byte at offset {exc.start})"], source) from exc
    data = _decode(text, Path(source).suffix.lower(), source)
    return parse_config(data, source=source)


def _decode(text: str, suffix: str, source: str) -> object:
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # the message already ends with "(at line L, column C)"
            raise ConfigError([f"invalid TOML: {exc}"], source) from exc
    if suffix in (".yaml", ".yml"):
        return _decode_yaml(text, source)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        note = "" if suffix == ".json" else " (files not named .toml/.yaml/.yml are read as JSON)"
        problem = f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{note}"
        raise ConfigError([problem], source) from exc


def _decode_yaml(text: str, source: str) -> object:
    # Imported here: only YAML files need it, and `import poise.config` stays cheap.
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or str(exc)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([f"invalid YAML{where}: {reason}"], source) from exc


def parse_backends(value: object, path: str) -> tuple[BackendConfig, ...]:
    """A backends list as in the config (URL strings or objects), for backend files.
    Raises ConfigError listing every problem."""
    c = Checker()
    result = _backends(c, value, path)
    if c.problems:
        raise ConfigError(c.problems, path)
    return result
