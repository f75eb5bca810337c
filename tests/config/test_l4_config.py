"""Config for TCP listeners: shapes, defaults, and every problem reported with its path."""

from __future__ import annotations

from typing import Any

import pytest

from poise.config import ConfigError, parse_config
from poise.config.l4 import parse_any_backend
from poise.config.model import SniRouteConfig, TcpListenerConfig


def doc(listener: dict[str, Any] | None = None, **upstream: Any) -> dict[str, Any]:
    up: dict[str, Any] = {"backends": ["tcp://127.0.0.1:5432"], **upstream}
    return {
        "listeners": [
            {
                "name": "pg",
                "listen": ":5432",
                "protocol": "tcp",
                "upstream": "db",
                **(listener or {}),
            }
        ],
        "upstreams": {"db": up},
    }


def problems(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(document)
    return info.value.problems


def test_minimal_tcp_listener_and_defaults() -> None:
    config = parse_config(doc())
    (lc,) = config.listeners
    assert (lc.protocol, lc.routes, lc.port) == ("tcp", (), 5432)
    assert lc.tcp == TcpListenerConfig(upstream="db")
    assert lc.tcp.idle_timeout == 3600.0
    assert lc.tcp.max_connections == 10000
    up = config.upstreams["db"]
    assert (up.backends[0].scheme, up.backends[0].host, up.backends[0].port) == (
        "tcp",
        "127.0.0.1",
        5432,
    )
    assert up.health_check.type == "tcp"  # tcp:// backends are checked by connecting


def test_all_tcp_listener_options() -> None:
    config = parse_config(
        doc(
            {
                "idle_timeout": "5m",
                "max_connections": 0,
                "connect_timeout": "250ms",
                "proxy_protocol": "v2",
                "accept_proxy": ["10.0.0.0/8", "::1"],
            }
        )
    )
    assert config.listeners[0].tcp == TcpListenerConfig(
        upstream="db",
        idle_timeout=300.0,
        max_connections=0,
        connect_timeout=0.25,
        proxy_protocol=2,
        accept_proxy=("10.0.0.0/8", "::1/128"),
    )


def test_http_listeners_are_unchanged() -> None:
    config = parse_config(
        {
            "listeners": [{"listen": ":8080", "upstream": "web"}],
            "upstreams": {"web": {"backends": ["http://127.0.0.1:80"]}},
        }
    )
    assert config.listeners[0].protocol == "http"
    assert config.listeners[0].tcp is None
    assert config.upstreams["web"].health_check.type == "http"


def test_a_tcp_listener_may_front_http_backends() -> None:
    config = parse_config(
        {
            "listeners": [
                {"listen": ":80", "upstream": "web"},
                {"name": "raw", "listen": ":81", "protocol": "tcp", "upstream": "web"},
            ],
            "upstreams": {"web": {"backends": ["http://127.0.0.1:8000"]}},
        }
    )
    assert config.listeners[1].tcp is not None


def test_send_and_expect_are_bytes() -> None:
    hc = {"send": "PING\r\n", "expect": "+PONG", "interval": "1s"}
    check = parse_config(doc(health_check=hc)).upstreams["db"].health_check
    assert (check.type, check.send, check.expect) == ("tcp", b"PING\r\n", b"+PONG")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tcp://127.0.0.1:5432", ("tcp", "127.0.0.1", 5432)),
        ("TCP://db.internal:6379", ("tcp", "db.internal", 6379)),
        ("tcp://[::1]:5432", ("tcp", "::1", 5432)),
        ("127.0.0.1:11211", ("tcp", "127.0.0.1", 11211)),
        ("[::1]:5672", ("tcp", "::1", 5672)),
        ("http://127.0.0.1:8000", ("http", "127.0.0.1", 8000)),
    ],
)
def test_backend_addresses(value: str, expected: tuple[str, str, int]) -> None:
    assert parse_any_backend(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tcp://127.0.0.1", "needs a port"),
        ("tcp://127.0.0.1:5432/db", "must not have a path"),
        ("tcp://127.0.0.1:0", "port out of range"),
        ("localhost", "not a URL"),
        ("udp://127.0.0.1:53", "unsupported scheme 'udp'"),
    ],
)
def test_bad_backend_addresses(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_any_backend(value)


def test_every_problem_is_reported_with_its_path() -> None:
    document = doc(
        {
            "routes": [{"upstream": "db"}],
            "idle_timeout": "soon",
            "max_connections": -1,
            "proxy_protocol": "v3",
            "accept_proxy": ["10.0.0.300/8"],
        },
        health_check={"type": "tcp", "send": 5, "expect": "", "path": "/x"},
    )
    document["listeners"].append({"name": "web", "listen": ":80", "idle_timeout": "1s",
                                  "upstream": "db"})  # fmt: skip
    assert problems(document) == [
        "listeners[0].routes: a TCP listener has no routes; name its 'upstream'",
        "listeners[0].idle_timeout: not a duration: 'soon' (e.g. '500ms', '2s', '1m30s', '1h', "
        "or a number of seconds)",
        "listeners[0].max_connections: must be at least 0, got -1",
        "listeners[0].proxy_protocol: must be 'v1', 'v2' or 'none', got 'v3'",
        "listeners[0].accept_proxy: not an address or CIDR network: '10.0.0.300/8'",
        "listeners[1].idle_timeout: applies only to listeners with protocol 'tcp'",
        "upstreams.db.health_check.path: applies only to http checks, not to type 'tcp'",
        "upstreams.db.health_check.send: expected a string, got integer",
        "upstreams.db.health_check.expect: must not be empty",
        "upstreams.db.backends[0]: 'tcp://127.0.0.1:5432' is a TCP backend, but HTTP listener "
        "'web' routes here (listeners[1]); HTTP routes need http:// backends",
    ]


def test_tcp_listener_needs_a_known_upstream() -> None:
    document = doc()
    del document["listeners"][0]["upstream"]
    document["listeners"].append({"name": "b", "listen": ":2", "protocol": "tcp",
                                  "upstream": "nope"})  # fmt: skip
    document["listeners"].append({"name": "c", "listen": ":3", "protocol": "udp",
                                  "upstream": "db"})  # fmt: skip
    assert problems(document) == [
        "listeners[0].upstream: required but missing (the upstream to relay to)",
        "listeners[1].upstream: unknown upstream 'nope' (known: db)",
        "listeners[2].protocol: must be one of http, tcp, got 'udp'",
    ]


def test_http_checks_take_no_send_or_expect() -> None:
    document = doc(health_check={"type": "http", "send": "x"})
    assert problems(document) == [
        "upstreams.db.health_check.send: applies only to tcp checks, not to type 'http'"
    ]


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        (
            "sticky",
            "upstreams.db.policy: sticky needs HTTP cookies; listeners[0] ('pg') is a TCP "
            "listener (use consistent_hash or hash on the client address)",
        ),
        (
            {"name": "consistent_hash", "key": "header:X-User"},
            "upstreams.db.policy.key: 'header:x-user' cannot be read from a TCP connection "
            "(listeners[0], 'pg', is a TCP listener); use 'ip'",
        ),
    ],
)
def test_tcp_listeners_hash_only_on_the_client_address(policy: Any, problem: str) -> None:
    assert problems(doc(policy=policy)) == [problem]


def test_source_ip_hash_is_fine() -> None:
    config = parse_config(doc(policy="ip_hash"))
    assert config.upstreams["db"].policy.key == "ip"


def sni_doc(sni: object, **extra: dict[str, Any]) -> dict[str, Any]:
    document = doc({"sni": sni})
    document["upstreams"].update(
        {
            "a": {"backends": ["tcp://127.0.0.1:8443"]},
            "b": {"backends": ["tcp://127.0.0.1:9443"]},
            **extra,
        }
    )
    return document


def test_sni_routes() -> None:
    config = parse_config(
        sni_doc(
            [
                {"names": ["A.Example.Test.", "*.b.example.test"], "upstream": "a"},
                {"names": "c.example.test", "upstream": "b"},
            ]
        )
    )
    tcp = config.listeners[0].tcp
    assert tcp is not None
    assert tcp.upstream == "db"  # the default: no SNI, no match, not TLS
    assert tcp.sni == (
        SniRouteConfig(("a.example.test", "*.b.example.test"), "a"),
        SniRouteConfig(("c.example.test",), "b"),
    )
    assert parse_config(doc()).listeners[0].tcp.sni == ()  # type: ignore[union-attr]


def test_sni_problems_are_reported_with_their_paths() -> None:
    document = sni_doc(
        [
            {"names": ["a.example.test"], "upstream": "y"},
            {"names": ["*.*.example.test", "a.b", 5], "upstream": "a"},
            {"names": [], "upstream": 3},
            {"names": ["A.example.test", "x.test"], "upstream": "b", "tls": True},
            {"upstream": "a"},
            "b",
        ]
    )
    document["listeners"].append(
        {"name": "web", "listen": ":80", "upstream": "db", "sni": [{"names": "x", "upstream": "a"}]}
    )
    assert problems(document) == [
        "listeners[0].sni[0].upstream: unknown upstream 'y' (known: a, b, db)",
        "listeners[0].sni[1].names: not a host name or '*.' wildcard: '*.*.example.test'",
        "listeners[0].sni[2].names: expected a host name or a non-empty list of them",
        "listeners[0].sni[2].upstream: expected a string, got integer",
        "listeners[0].sni[3].tls: unknown key (expected one of: names, upstream)",
        "listeners[0].sni[3].names: 'a.example.test' is already routed by listeners[0].sni[0]",
        "listeners[0].sni[4].names: required but missing",
        "listeners[0].sni[5]: expected an object, got string",
        "listeners[1].sni: applies only to listeners with protocol 'tcp'",
        "upstreams.db.backends[0]: 'tcp://127.0.0.1:5432' is a TCP backend, but HTTP listener "
        "'web' routes here (listeners[1]); HTTP routes need http:// backends",
    ]


def test_sni_routes_must_not_be_empty() -> None:
    assert problems(sni_doc([])) == ["listeners[0].sni: must not be empty"]


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        (
            "sticky",
            "upstreams.a.policy: sticky needs HTTP cookies; listeners[0].sni[1] routes TCP "
            "listener 'pg' here (use consistent_hash or hash on the client address)",
        ),
        (
            {"name": "consistent_hash", "key": "cookie:id"},
            "upstreams.a.policy.key: 'cookie:id' cannot be read from a TCP connection "
            "(listeners[0].sni[1]: TCP listener 'pg' routes here); use 'ip'",
        ),
    ],
)
def test_sni_upstreams_hash_only_on_the_client_address(policy: Any, problem: str) -> None:
    document = sni_doc(
        [
            {"names": ["b.example.test"], "upstream": "b"},
            {"names": ["a.example.test"], "upstream": "a"},
            {"names": ["c.example.test"], "upstream": "a"},  # reported once
        ]
    )
    document["upstreams"]["a"]["policy"] = policy
    assert problems(document) == [problem]
