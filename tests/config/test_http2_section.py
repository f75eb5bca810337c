"""HTTP/2 in the config: a listener's ``http2``, an upstream's ``protocol``, and the grpc
health check (docs/http2.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from poise.config import ConfigError, parse_config
from poise.config.model import Http2Config


def doc(listener: dict[str, Any] | None = None, **upstream: Any) -> dict[str, Any]:
    return {
        "listeners": [{"listen": "127.0.0.1:8080", "upstream": "api", **(listener or {})}],
        "upstreams": {"api": {"backends": ["http://127.0.0.1:9000"], **upstream}},
    }


def tls(tmp_path: Path) -> dict[str, str]:
    from tests.tls.certgen import CA

    pair = CA(tmp_path).issue("site", ["site.test"])
    return {"cert": str(pair.cert), "key": str(pair.key)}


def test_http2_is_on_for_https_listeners_and_off_for_plain_ones(tmp_path: Path) -> None:
    plain = parse_config(doc()).listeners[0]
    assert plain.http2 is None
    https = parse_config(doc({"tls": tls(tmp_path)})).listeners[0]
    assert https.http2 == Http2Config()
    assert https.tls is not None and https.tls.alpn == ("h2", "http/1.1")
    off = parse_config(doc({"tls": tls(tmp_path), "http2": False})).listeners[0]
    assert off.http2 is None
    assert off.tls is not None and off.tls.alpn == ("http/1.1",)
    h2c = parse_config(doc({"http2": True})).listeners[0]
    assert h2c.http2 == Http2Config()


def test_the_http2_limits_take_values() -> None:
    got = parse_config(doc({"http2": {
        "max_concurrent_streams": 32, "initial_window_size": 65535, "max_frame_size": 32768,
        "max_header_list_size": 16384,
    }})).listeners[0].http2  # fmt: skip
    assert got == Http2Config(32, 65535, 32768, 16384)
    assert parse_config(doc({"http2": {"enabled": False}})).listeners[0].http2 is None


def test_every_bad_http2_key_is_reported_with_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc({"http2": {
            "max_concurrent_streams": 0, "initial_window_size": 10, "max_frame_size": 1,
            "max_header_list_size": "big", "streams": 5,
        }}))  # fmt: skip
    problems = info.value.problems
    for key in ("max_concurrent_streams", "initial_window_size", "max_frame_size",
                "max_header_list_size", "streams"):  # fmt: skip
        assert any(p.startswith(f"listeners[0].http2.{key}:") for p in problems), (key, problems)
    assert len(problems) == 5


def test_http2_is_for_http_listeners_only() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({
            "listeners": [{"listen": "127.0.0.1:8080", "protocol": "tcp", "upstream": "db",
                           "http2": True}],
            "upstreams": {"db": {"backends": ["tcp://127.0.0.1:5432"]}},
        })  # fmt: skip
    assert any(p.startswith("listeners[0].http2:") for p in info.value.problems)


def test_an_upstreams_protocol() -> None:
    assert parse_config(doc()).upstreams["api"].protocol == "http1"
    h2 = parse_config(doc(protocol="h2")).upstreams["api"]
    assert (h2.protocol, h2.health_check.type) == ("h2", "http")
    grpc = parse_config(doc(protocol="grpc")).upstreams["api"]
    assert (grpc.protocol, grpc.health_check.type) == ("grpc", "grpc")
    named = parse_config(doc(protocol="grpc", health_check={"service": "users.v1"}))
    assert named.upstreams["api"].health_check.service == "users.v1"


def test_bad_protocol_settings_are_reported_with_their_paths() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc(protocol="http3", health_check={"service": "x"}))
    problems = info.value.problems
    assert any(p.startswith("upstreams.api.protocol:") and "http1, h2, grpc" in p
               for p in problems)  # fmt: skip
    assert any(p.startswith("upstreams.api.health_check.service:") and "grpc" in p
               for p in problems)  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_config(doc(protocol="grpc", health_check={"path": "/h", "body": "ok"}))
    problems = info.value.problems
    assert any(p.startswith("upstreams.api.health_check.path:") for p in problems)
    assert any(p.startswith("upstreams.api.health_check.body:") for p in problems)
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "listeners": [{"listen": "127.0.0.1:8080", "upstream": "db"}],
                "upstreams": {"db": {"protocol": "h2", "backends": ["tcp://127.0.0.1:5432"]}},
            }
        )
    assert any(p.startswith("upstreams.db.protocol:") for p in info.value.problems)
