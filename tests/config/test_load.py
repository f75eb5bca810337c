from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from poise.config import (
    BackendConfig,
    Config,
    ConfigError,
    HealthCheckConfig,
    ListenerConfig,
    LogConfig,
    PolicyConfig,
    PoolConfig,
    ProxyConfig,
    RouteConfig,
    TimeoutConfig,
    UpstreamConfig,
    load_config,
    parse_backend_url,
    parse_config,
    parse_duration,
    parse_listen,
)

SEED = {
    "port": ":8080",
    "healthCheckInterval": "2s",
    "servers": ["http://localhost:5001", "http://localhost:5002"],
}

FULL_JSON = """
{
  "listeners": [
    {"name": "web", "listen": "127.0.0.1:8080",
     "routes": [
       {"host": "api.example.com", "path": "/v1", "upstream": "api"},
       {"host": ["a.example", "b.example"], "upstream": "api"},
       {"upstream": "web"}
     ]},
    {"listen": ":9090", "upstream": "web"}
  ],
  "upstreams": {
    "api": {
      "backends": ["http://127.0.0.1:5001", {"url": "http://127.0.0.1:5002", "weight": 3}],
      "policy": "round_robin",
      "health_check": {"type": "http", "method": "GET", "path": "/healthz", "host": "api.local",
                       "expected_status": "200-399", "interval": "2s", "timeout": "1s",
                       "rise": 2, "fall": 3, "enabled": true},
      "pool": {"max_idle": 64, "idle_timeout": "4s"}
    },
    "web": {"backends": ["http://127.0.0.1:5003"]}
  },
  "timeouts": {"client_header": "10s", "client_idle": "60s", "upstream_connect": "3s",
               "upstream_response": "60s", "drain": "30s"},
  "proxy": {"x_forwarded": true, "x_forwarded_server": false},
  "log": {"level": "info", "format": "text"}
}
"""

FULL_TOML = """
[[listeners]]
name = "web"
listen = "127.0.0.1:8080"

  [[listeners.routes]]
  host = "api.example.com"
  path = "/v1"
  upstream = "api"

  [[listeners.routes]]
  host = ["a.example", "b.example"]
  upstream = "api"

  [[listeners.routes]]
  upstream = "web"

[[listeners]]
listen = ":9090"
upstream = "web"

[upstreams.api]
backends = ["http://127.0.0.1:5001", { url = "http://127.0.0.1:5002", weight = 3 }]
policy = "round_robin"

[upstreams.api.health_check]
type = "http"
method = "GET"
path = "/healthz"
host = "api.local"
expected_status = "200-399"
interval = "2s"
timeout = "1s"
rise = 2
fall = 3
enabled = true

[upstreams.api.pool]
max_idle = 64
idle_timeout = "4s"

[upstreams.web]
backends = ["http://127.0.0.1:5003"]

[timeouts]
client_header = "10s"
client_idle = "60s"
upstream_connect = "3s"
upstream_response = "60s"
drain = "30s"

[proxy]
x_forwarded = true
x_forwarded_server = false

[log]
level = "info"
format = "text"
"""

FULL_YAML = """
listeners:
  - name: web
    listen: "127.0.0.1:8080"
    routes:
      - {host: api.example.com, path: /v1, upstream: api}
      - host: [a.example, b.example]
        upstream: api
      - upstream: web
  - listen: ":9090"
    upstream: web
upstreams:
  api:
    backends:
      - http://127.0.0.1:5001
      - {url: "http://127.0.0.1:5002", weight: 3}
    policy: round_robin
    health_check:
      type: http
      method: GET
      path: /healthz
      host: api.local
      expected_status: 200-399
      interval: 2s
      timeout: 1s
      rise: 2
      fall: 3
      enabled: true
    pool: {max_idle: 64, idle_timeout: 4s}
  web:
    backends: ["http://127.0.0.1:5003"]
timeouts:
  client_header: 10s
  client_idle: 60s
  upstream_connect: 3s
  upstream_response: 60s
  drain: 30s
proxy: {x_forwarded: true, x_forwarded_server: false}
log: {level: info, format: text}
"""


def full() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FULL_JSON)
    return data


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def minimal(**upstream: Any) -> dict[str, Any]:
    """A valid full-format document whose single upstream "api" gets ``upstream`` merged in."""
    return {
        "listeners": [{"listen": ":8080", "upstream": "api"}],
        "upstreams": {"api": {"backends": ["http://127.0.0.1:5001"], **upstream}},
    }


# --- seed format -------------------------------------------------------------------------------


def test_seed_config_builds_one_listener_and_one_upstream() -> None:
    config = parse_config(SEED)

    assert config.listeners == (
        ListenerConfig("default", "", 8080, (RouteConfig(upstream="default"),)),
    )
    assert list(config.upstreams) == ["default"]
    upstream = config.upstreams["default"]
    assert upstream.backends == (
        BackendConfig("http://localhost:5001", "http", "localhost", 5001, 1),
        BackendConfig("http://localhost:5002", "http", "localhost", 5002, 1),
    )
    assert upstream.health_check == HealthCheckConfig(interval=2.0, timeout=1.0)
    assert upstream.policy == PolicyConfig()
    assert upstream.pool == PoolConfig()
    assert config.timeouts == TimeoutConfig()
    assert config.source is None


def test_seed_short_interval_shrinks_timeout_and_interval_defaults_to_2s() -> None:
    short = parse_config({**SEED, "healthCheckInterval": "500ms"})
    assert short.upstreams["default"].health_check.interval == 0.5
    assert short.upstreams["default"].health_check.timeout == 0.5

    no_interval = {k: v for k, v in SEED.items() if k != "healthCheckInterval"}
    health = parse_config(no_interval).upstreams["default"].health_check
    assert (health.interval, health.timeout) == (2.0, 1.0)


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        (":8080", ("", 8080)),
        ("8080", ("", 8080)),
        (8080, ("", 8080)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:80", ("::1", 80)),
    ],
)
def test_seed_port_forms(port: object, expected: tuple[str, int]) -> None:
    listener = parse_config({**SEED, "port": port}).listeners[0]
    assert (listener.host, listener.port) == expected


def test_seed_requires_port_and_servers() -> None:
    assert problems_of({"healthCheckInterval": "2s"}) == [
        "port: required but missing",
        "servers: required but missing",
    ]
    assert problems_of({"port": 80, "servers": []}) == ["servers: must not be empty"]


def test_seed_problems_have_paths_and_hints() -> None:
    data = {
        "port": "localhost:http",
        "servers": ["http://a:1", "ftp://b"],
        "healthcheckinterval": 2,
    }
    assert problems_of(data) == [
        "healthcheckinterval: unknown key (did you mean 'healthCheckInterval'?)",
        "port: invalid port 'http' in listen address 'localhost:http'",
        "servers[1]: unsupported scheme 'ftp' in 'ftp://b' (only 'http', 'https')",
    ]


def test_seed_accepts_shared_sections() -> None:
    config = parse_config({**SEED, "timeouts": {"drain": "1s"}, "log": {"format": "json"}})
    assert config.timeouts.drain == 1.0
    assert config.log.format == "json"


def test_mixing_seed_and_full_format_is_an_error() -> None:
    data = {**full(), "port": ":8080"}
    [problem] = problems_of(data)
    assert problem.startswith("top level: cannot mix the seed format")
    assert "'port'" in problem
    assert "'listeners'" in problem


# --- parse_listen ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (":8080", ("", 8080)),
        ("8080", ("", 8080)),
        (8080, ("", 8080)),
        (0, ("", 0)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:8080", ("::1", 8080)),
        ("localhost:8080", ("localhost", 8080)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_listen_valid(value: object, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty listen address"),
        ("localhost", "missing port"),
        ("localhost:", "invalid port ''"),
        (":65536", "port out of range"),
        (70000, "port out of range"),
        (-1, "port out of range"),
        ("::1:8080", "IPv6 addresses must be in brackets"),
        ("[::1]", "missing port"),
        ("[nope]:80", "invalid IPv6 address"),
        ("a b:80", "invalid host 'a b'"),
        ("300.1.1.1:80", "invalid host '300.1.1.1'"),
        (" 8080", "invalid host ' 8080'"),
        (":8_0", "invalid port '8_0'"),
        (":+80", "invalid port '+80'"),
        (True, "got boolean"),
        (80.0, "got number"),
        (None, "got null"),
    ],
)
def test_parse_listen_invalid(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_listen(value)
    assert message in str(info.value)


# --- parse_duration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("250us", 0.00025),
        ("250\u00b5s", 0.00025),
        ("250\u03bcs", 0.00025),
        ("10ns", 1e-8),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("0", 0.0),
        (3, 3.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration_valid(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert type(result) is float
    assert math.isclose(result, seconds, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty duration"),
        ("2 s", "not a duration: '2 s'"),
        ("s", "not a duration: 's'"),
        ("1x", "unknown unit 'x'"),
        ("+1s", "not a duration: '+1s'"),
        ("-1s", "must not be negative"),
        ("nan", "not a duration: 'nan'"),
        ("inf", "not a duration: 'inf'"),
        ("1_0s", "not a duration: '1_0s'"),
        (" 2s", "not a duration: ' 2s'"),
        ("2s ", "not a duration: '2s '"),
        ("2", "missing unit in duration '2'"),
        ("\u0661s", "not a duration"),  # ARABIC-INDIC DIGIT ONE: \d would accept it
        (-1, "must not be negative"),
        (-0.5, "must not be negative"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (True, "got boolean"),
        (None, "got null"),
        (["2s"], "got list"),
        (10**400, "too large"),
    ],
)
def test_parse_duration_invalid(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert message in str(info.value)


# --- parse_backend_url -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://localhost:5001", ("http", "localhost", 5001)),
        ("http://localhost", ("http", "localhost", 80)),
        ("http://Example.COM/", ("http", "example.com", 80)),
        ("HTTP://127.0.0.1:8000", ("http", "127.0.0.1", 8000)),
        ("http://[::1]:5001", ("http", "::1", 5001)),
        ("http://my_service:80", ("http", "my_service", 80)),
        ("https://localhost", ("https", "localhost", 443)),
        ("HTTPS://a.example:8443/", ("https", "a.example", 8443)),
    ],
)
def test_parse_backend_url_valid(url: str, expected: tuple[str, str, int]) -> None:
    assert parse_backend_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://localhost:5001/api", "backend URL must not have a path"),
        ("http://user:pw@localhost:5001", "must not contain user info"),
        ("http://", "backend URL has no host"),
        ("http://:5001", "backend URL has no host"),
        ("foo", "not a URL: 'foo'"),
        ("localhost:5001", "not a URL"),
        ("http://localhost:5001?x=1", "must not have a query"),
        ("http://localhost:5001/#top", "must not have a fragment"),
        ("ftp://localhost", "unsupported scheme 'ftp'"),
        ("http://localhost:0", "port out of range (1-65535)"),
        ("http://localhost:99999", "port out of range"),
        ("http://localhost:x", "invalid port 'x'"),
        ("http://local host", "not a URL"),
        ("http://::1:80", "IPv6 addresses must be in brackets"),
    ],
)
def test_parse_backend_url_invalid(url: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_backend_url(url)
    assert message in str(info.value)


# --- full format -------------------------------------------------------------------------------


def test_full_format_builds_the_documented_config() -> None:
    config = parse_config(full(), source="x.json")

    api_health = HealthCheckConfig(
        enabled=True,
        type="http",
        method="GET",
        path="/healthz",
        host="api.local",
        expected_status=((200, 399),),
        interval=2.0,
        timeout=1.0,
        rise=2,
        fall=3,
    )
    expected = Config(
        listeners=(
            ListenerConfig(
                "web",
                "127.0.0.1",
                8080,
                (
                    RouteConfig("api", ("api.example.com",), "/v1"),
                    RouteConfig("api", ("a.example", "b.example"), "/"),
                    RouteConfig("web"),
                ),
            ),
            ListenerConfig("listener1", "", 9090, (RouteConfig("web"),)),
        ),
        upstreams=MappingProxyType(
            {
                "api": UpstreamConfig(
                    "api",
                    (
                        BackendConfig("http://127.0.0.1:5001", "http", "127.0.0.1", 5001, 1),
                        BackendConfig("http://127.0.0.1:5002", "http", "127.0.0.1", 5002, 3),
                    ),
                    PolicyConfig("round_robin"),
                    api_health,
                    PoolConfig(64, 4.0),
                ),
                "web": UpstreamConfig(
                    "web", (BackendConfig("http://127.0.0.1:5003", "http", "127.0.0.1", 5003),)
                ),
            }
        ),
        timeouts=TimeoutConfig(10.0, 60.0, 3.0, 60.0, 30.0),
        proxy=ProxyConfig(x_forwarded=True, x_forwarded_server=False),
        log=LogConfig("info", "text"),
        source="x.json",
    )
    assert config == expected


def test_upstreams_is_read_only_and_keeps_document_order() -> None:
    data = full()
    data["upstreams"] = {"zeta": data["upstreams"]["web"], "alpha": data["upstreams"]["api"]}
    data["listeners"] = [{"listen": ":80", "upstream": "zeta"}]
    config = parse_config(data)
    assert isinstance(config.upstreams, MappingProxyType)
    assert list(config.upstreams) == ["zeta", "alpha"]
    with pytest.raises(TypeError):
        config.upstreams["x"] = config.upstreams["zeta"]  # type: ignore[index]


@pytest.mark.parametrize(("name", "text"), [("c.toml", FULL_TOML), ("c.yaml", FULL_YAML)])
def test_toml_and_yaml_files_equal_the_json_file(tmp_path: Path, name: str, text: str) -> None:
    json_file = tmp_path / "c.json"
    json_file.write_text(FULL_JSON, encoding="utf-8")
    other = tmp_path / name
    other.write_text(text, encoding="utf-8")

    from_json = load_config(json_file)
    from_other = load_config(other)

    assert from_json.source == str(json_file)
    assert from_other.source == str(other)
    assert from_other == Config(**{**_fields(from_json), "source": str(other)})
    assert from_json == parse_config(full(), source=str(json_file))


def _fields(config: Config) -> dict[str, Any]:
    return {name: getattr(config, name) for name in Config.__dataclass_fields__}


def test_yml_extension_and_unknown_extension_fall_back(tmp_path: Path) -> None:
    yml = tmp_path / "c.yml"
    yml.write_text(FULL_YAML, encoding="utf-8")
    conf = tmp_path / "poise.conf"
    conf.write_text(json.dumps(SEED), encoding="utf-8")
    assert load_config(yml).listeners[0].name == "web"
    assert load_config(str(conf)).listeners[0].port == 8080


def test_several_mistakes_are_all_reported_with_their_paths() -> None:
    data = full()
    data["listeners"][0]["lisen"] = ":1"
    data["listeners"][0]["routes"][1]["upstream"] = "x"
    data["listeners"][0]["routes"][0]["path"] = "v1"
    data["listeners"][1]["listen"] = "127.0.0.1:8080"
    data["upstreams"]["api"]["backends"].append("foo")
    data["upstreams"]["api"]["backends"][1]["weight"] = True
    data["upstreams"]["api"]["policy"] = "fastest"
    data["upstreams"]["api"]["health_check"].update(timeout="5s", rise=0, enabled="true")
    data["upstreams"]["api"]["pool"]["max_idle"] = -1
    data["upstreams"]["web"]["backends"] = []
    data["timeouts"]["drain"] = "0s"
    data["log"]["level"] = "verbose"

    assert problems_of(data) == [
        "listeners[0].lisen: unknown key (did you mean 'listen'?)",
        "listeners[0].routes[0].path: must start with '/', got 'v1'",
        "listeners[0].routes[1].upstream: unknown upstream 'x' (known: api, web)",
        "listeners[1].listen: 127.0.0.1:8080 conflicts with listeners[0] ('web', 127.0.0.1:8080)",
        "upstreams.api.backends[1].weight: expected an integer, got boolean",
        "upstreams.api.backends[2]: not a URL: 'foo' (expected e.g. 'http://127.0.0.1:5001')",
        "upstreams.api.policy.name: unknown policy 'fastest' (available: round_robin, "
        "weighted_round_robin, random, weighted_random, least_conn, p2c, peak_ewma, hash, "
        "consistent_hash, first, sticky)",
        "upstreams.api.health_check.enabled: expected a boolean (true or false), got string",
        "upstreams.api.health_check.timeout: must not be longer than interval (2s), got 5s",
        "upstreams.api.health_check.rise: must be at least 1, got 0",
        "upstreams.api.pool.max_idle: must be at least 0, got -1",
        "upstreams.web.backends: must not be empty",
        "timeouts.drain: must be greater than 0, got '0s'",
        "log.level: must be one of debug, info, warning, error, got 'verbose'",
    ]


def test_config_error_carries_source_and_lists_problems() -> None:
    data = minimal(policy={"name": "fastest"})
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="poise.yaml")
    assert info.value.source == "poise.yaml"
    assert "in poise.yaml" in str(info.value)
    assert "upstreams.api.policy.name: unknown policy 'fastest'" in str(info.value)


@pytest.mark.parametrize(
    ("key", "hint"),
    [("lisen", "'listen'"), ("route", "'routes'"), ("upstrem", "'upstream'")],
)
def test_unknown_key_suggests_the_closest_one(key: str, hint: str) -> None:
    data = full()
    data["listeners"][1][key] = data["listeners"][1].get("upstream", "x")
    if key == "upstrem":
        del data["listeners"][1]["upstream"]
        expected = [
            f"listeners[1].{key}: unknown key (did you mean {hint}?)",
            "listeners[1]: needs 'routes' (a list) or 'upstream' (the name of an upstream)",
        ]
    else:
        expected = [f"listeners[1].{key}: unknown key (did you mean {hint}?)"]
    assert problems_of(data) == expected


def test_unknown_key_hint_ignores_case_and_separators() -> None:
    assert problems_of(minimal(healthCheck={})) == [
        "upstreams.api.healthCheck: unknown key (did you mean 'health_check'?)"
    ]
    assert problems_of({**minimal(), "colour": 1}) == [
        "colour: unknown key (expected one of: listeners, upstreams, timeouts, proxy, limits, "
        "log, registry, admin)"
    ]


def test_unknown_upstream_reference_lists_known_names() -> None:
    data = full()
    data["listeners"][1]["upstream"] = "wbe"
    assert problems_of(data) == ["listeners[1].upstream: unknown upstream 'wbe' (known: api, web)"]


def test_broken_upstream_still_counts_as_known_for_references() -> None:
    data = full()
    data["upstreams"]["web"]["backends"] = ["ftp://x"]
    assert problems_of(data) == [
        "upstreams.web.backends[0]: unsupported scheme 'ftp' in 'ftp://x' (only 'http', 'https')"
    ]


def test_bad_backend_urls_are_reported_at_their_paths() -> None:
    data = minimal()
    data["upstreams"]["api"]["backends"] = [
        "gopher://a:1",
        "http://a:2/path",
        {"url": "http://me@a:3"},
        "http://",
        {"url": "foo", "weight": 2},
        7,
        {"weight": 2},
        {"url": "http://a:4", "weight": 0},
        {"url": "http://a:5", "weight": 1001},
    ]
    assert problems_of(data) == [
        "upstreams.api.backends[0]: unsupported scheme 'gopher' in 'gopher://a:1' "
        "(only 'http', 'https')",
        "upstreams.api.backends[1]: backend URL must not have a path: 'http://a:2/path'",
        "upstreams.api.backends[2].url: backend URL must not contain user info (user@): "
        "'http://me@a:3'",
        "upstreams.api.backends[3]: backend URL has no host: 'http://'",
        "upstreams.api.backends[4].url: not a URL: 'foo' (expected e.g. 'http://127.0.0.1:5001')",
        "upstreams.api.backends[5]: expected a URL string or an object with 'url', got integer",
        "upstreams.api.backends[6].url: required but missing",
        "upstreams.api.backends[7].weight: must be at least 1 (weight 0 is not supported yet)",
        "upstreams.api.backends[8].weight: must be between 1 and 1000, got 1001",
    ]


def test_duplicate_backend_address_in_one_upstream() -> None:
    data = minimal()
    data["upstreams"]["api"]["backends"] = ["http://A:80", "http://b", "http://a/"]
    assert problems_of(data) == [
        "upstreams.api.backends[2]: duplicate backend 'http://a/' "
        "(same address as upstreams.api.backends[0])"
    ]


def test_policy_aliases_are_stored_canonically() -> None:
    for written in ["rr", "roundrobin", "Round_Robin", {"name": "rr"}]:
        config = parse_config(minimal(policy=written))
        assert config.upstreams["api"].policy == PolicyConfig("round_robin")
    assert problems_of(minimal(policy={"nam": "rr"})) == [
        "upstreams.api.policy.nam: unknown key (did you mean 'name'?)",
        "upstreams.api.policy.name: required but missing",
    ]
    assert problems_of(minimal(policy=3)) == [
        "upstreams.api.policy: expected a policy name or an object with 'name', got integer"
    ]


@pytest.mark.parametrize(
    ("written", "ranges"),
    [
        (200, ((200, 200),)),
        ("204", ((204, 204),)),
        ("200-399", ((200, 399),)),
        ([200, "301-302", "404"], ((200, 200), (301, 302), (404, 404))),
    ],
)
def test_expected_status_forms(written: object, ranges: tuple[tuple[int, int], ...]) -> None:
    config = parse_config(minimal(health_check={"expected_status": written}))
    assert config.upstreams["api"].health_check.expected_status == ranges


def test_expected_status_errors() -> None:
    data = minimal(health_check={"expected_status": ["200", 99, "399-200", "2xx", True, "600"]})
    path = "upstreams.api.health_check.expected_status"
    assert problems_of(data) == [
        f"{path}[1]: status code out of range (100-599): 99",
        f"{path}[2]: empty status range '399-200': 399 > 200",
        f"{path}[3]: not a status code or range: '2xx' (e.g. 200 or '200-399')",
        f"{path}[4]: expected a status code or range like 200 or '200-399', got boolean",
        f"{path}[5]: status code out of range (100-599): 600",
    ]
    assert problems_of(minimal(health_check={"expected_status": []})) == [
        f"{path}: must not be empty"
    ]
    assert problems_of(minimal(health_check={"expected_status": "200-700"})) == [
        f"{path}: status code out of range (100-599): 700"
    ]


def test_health_check_fields_are_validated() -> None:
    data = minimal(
        health_check={
            "type": "udp",
            "method": "get",
            "path": "healthz",
            "host": "bad host",
            "interval": "0s",
            "fall": 1.5,
        }
    )
    path = "upstreams.api.health_check"
    assert problems_of(data) == [
        f"{path}.type: must be one of http, tcp, grpc, got 'udp'",
        f"{path}.method: not an upper-case HTTP method: 'get' (did you mean 'GET'?)",
        f"{path}.path: must start with '/', got 'healthz'",
        f"{path}.host: invalid host name 'bad host'",
        f"{path}.interval: must be greater than 0, got '0s'",
        f"{path}.fall: expected an integer, got number",
    ]


def test_health_check_short_interval_without_timeout_gets_a_fitting_timeout() -> None:
    health = parse_config(minimal(health_check={"interval": "200ms"})).upstreams["api"].health_check
    assert (health.interval, health.timeout) == (0.2, 0.2)
    health = (
        parse_config(minimal(health_check={"type": "tcp", "timeout": 0.5}))
        .upstreams["api"]
        .health_check
    )
    assert (health.type, health.interval, health.timeout) == ("tcp", 2.0, 0.5)


def test_route_hosts_are_normalized_and_validated() -> None:
    data = minimal()
    data["listeners"] = [
        {
            "listen": ":80",
            "routes": [
                {
                    "host": ["API.Example.com.", "api.example.com:8080", "[::1]:80"],
                    "upstream": "api",
                }
            ],
        }
    ]
    route = parse_config(data).listeners[0].routes[0]
    assert route.hosts == ("api.example.com", "::1")

    data["listeners"][0]["routes"] = [
        {"host": ["ok.example", "a b", "x/y", "user@x", "", 5], "upstream": "api"},
        {"host": [], "upstream": "api"},
    ]
    path = "listeners[0].routes"
    assert problems_of(data) == [
        f"{path}[0].host[1]: invalid host name 'a b'",
        f"{path}[0].host[2]: invalid host name 'x/y'",
        f"{path}[0].host[3]: invalid host name 'user@x'",
        f"{path}[0].host[4]: invalid host name ''",
        f"{path}[0].host[5]: expected a string, got integer",
        f"{path}[1].host: must not be empty (leave 'host' out to match any host)",
    ]


def test_listener_rules() -> None:
    data = minimal()
    data["listeners"] = [
        {"listen": ":80", "upstream": "api", "routes": [{"upstream": "api"}]},
        {"listen": ":81"},
        {"name": "a", "listen": ":82", "routes": []},
        {"name": "a", "upstream": "api"},
        {"listen": "127.0.0.1:80", "upstream": "api"},
        {"listen": ":0", "upstream": "api"},
        {"listen": "127.0.0.1:0", "upstream": "api"},
        "oops",
    ]
    assert problems_of(data) == [
        "listeners[0]: has both 'routes' and 'upstream'; use 'routes' for several routes, or "
        "'upstream' alone for one catch-all route",
        "listeners[1]: needs 'routes' (a list) or 'upstream' (the name of an upstream)",
        "listeners[2].routes: must not be empty",
        "listeners[3].name: duplicate listener name 'a' (also listeners[2])",
        "listeners[3].listen: required but missing",
        "listeners[7]: expected an object, got string",
        "listeners[4].listen: 127.0.0.1:80 conflicts with listeners[0] ('listener0', :80)",
    ]


def test_top_level_shape_errors() -> None:
    assert problems_of(None) == ["top level: the configuration is empty"]
    assert problems_of({}) == ["top level: the configuration is empty"]
    assert problems_of([SEED]) == ["top level: expected an object, got list"]
    assert problems_of({"log": {"level": "debug"}}) == [
        "listeners: required but missing",
        "upstreams: required but missing",
    ]
    assert problems_of({"listeners": [], "upstreams": {}}) == [
        "listeners: must not be empty",
        "upstreams: must define at least one upstream",
    ]


def test_booleans_and_ints_are_strict() -> None:
    data = full()
    data["proxy"] = {"x_forwarded": 1, "x_forwarded_server": "false"}
    data["upstreams"]["api"]["pool"] = {"max_idle": True, "idle_timeout": True}
    assert problems_of(data) == [
        "upstreams.api.pool.max_idle: expected an integer, got boolean",
        "upstreams.api.pool.idle_timeout: expected a duration (e.g. '500ms', '2s', '1m30s', "
        "'1h', or a number of seconds), got boolean",
        "proxy.x_forwarded: expected a boolean (true or false), got integer",
        "proxy.x_forwarded_server: expected a boolean (true or false), got string",
    ]


def test_optional_sections_default_and_accept_numbers_as_seconds() -> None:
    data = minimal()
    data["timeouts"] = {"drain": 5, "client_header": 2.5}
    data["log"] = {"level": "WARNING", "format": "json"}
    config = parse_config(data)
    assert config.timeouts == TimeoutConfig(client_header=2.5, drain=5.0)
    assert config.log == LogConfig("warning", "json")
    assert config.proxy == ProxyConfig()


def test_parse_config_does_not_modify_its_input() -> None:
    data = full()
    before = copy.deepcopy(data)
    parse_config(data)
    assert data == before


# --- load_config errors ------------------------------------------------------------------------


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.source == str(missing)
    assert info.value.problems == ["cannot read configuration file: No such file or directory"]

    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.problems[0].startswith("cannot read configuration file:")


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"port": ":8080",\n "servers": [1,]}', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["invalid JSON at line 2, column 16: Expecting value"]
    assert str(path) in str(info.value)


def test_invalid_toml_and_yaml_report_positions(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('port = ":8080"\nservers = [1,,]\n', encoding="utf-8")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("port: ':8080'\nservers: [a\nb: c\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(toml)
    [problem] = info.value.problems
    assert problem.startswith("invalid TOML:")
    assert "line 2, column 14" in problem
    with pytest.raises(ConfigError) as info:
        load_config(yaml)
    [problem] = info.value.problems
    assert problem.startswith("invalid YAML at line 3, column 2:")


def test_unknown_extension_is_read_as_json_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "poise.cfg"
    path.write_text("port: 80\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith("invalid JSON at line 1, column 1")
    assert "read as JSON" in problem


def test_non_utf8_and_semantic_errors_from_files(tmp_path: Path) -> None:
    binary = tmp_path / "c.json"
    binary.write_bytes(b'{"port": "\xff"}')
    with pytest.raises(ConfigError) as info:
        load_config(binary)
    assert info.value.problems == ["not UTF-8 text (bad byte at offset 10)"]

    bad = tmp_path / "c.yaml"
    bad.write_text("port: ':8080'\nservers: [foo]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.source == str(bad)
    assert info.value.problems == [
        "servers[0]: not a URL: 'foo' (expected e.g. 'http://127.0.0.1:5001')"
    ]


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(SEED).encode())
    assert load_config(path).listeners[0].port == 8080


def test_limits_proxy_trust_and_body_timeout_sections() -> None:
    config = parse_config(
        {
            "port": ":8080",
            "servers": ["http://127.0.0.1:1"],
            "limits": {"max_body_size": 1000, "max_connections": 5},
            "proxy": {"trusted_proxies": ["10.0.0.0/8", "::1"], "forwarded": True, "via": True},
            "timeouts": {"client_body": "5s"},
        }
    )
    assert config.limits.max_body_size == 1000
    assert config.limits.max_connections == 5
    assert config.limits.max_header_bytes == 64 * 1024
    assert config.proxy.trusted_proxies == ("10.0.0.0/8", "::1/128")
    assert config.proxy.forwarded and config.proxy.via
    assert config.timeouts.client_body == 5.0


def test_bad_limits_and_trusted_proxies_are_reported_with_paths() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(
            {
                "port": ":8080",
                "servers": ["http://127.0.0.1:1"],
                "limits": {"max_header_bytes": 10, "max_body_size": -1},
                "proxy": {"trusted_proxies": ["10.0.0.0/33"]},
            }
        )
    problems = exc.value.problems
    assert any(p.startswith("limits.max_header_bytes: must be at least 1024") for p in problems)
    assert any(p.startswith("limits.max_body_size: must be at least 0") for p in problems)
    assert any(p.startswith("proxy.trusted_proxies: not an address") for p in problems)


def test_policy_names_aliases_and_options() -> None:
    def policy(p: object) -> PolicyConfig:
        doc = {"listeners": [{"listen": ":1", "upstream": "u"}],
               "upstreams": {"u": {"backends": ["http://127.0.0.1:1"], "policy": p}}}  # fmt: skip
        return parse_config(doc).upstreams["u"].policy

    assert policy("ip_hash") == PolicyConfig(name="hash", key="ip")
    assert policy("maglev") == PolicyConfig(name="consistent_hash", key="ip", algorithm="maglev")
    assert policy("least-connections").name == "least_conn"
    assert policy({"name": "consistent_hash", "key": "header:X-User", "balance_factor": 1.25}) == (
        PolicyConfig(name="consistent_hash", key="header:x-user", balance_factor=1.25)
    )
    assert policy({"name": "hash", "key": "query:key", "default_key": "d"}).default_key == "d"
    assert policy({"name": "p2c", "bias": 2}).bias == 2.0


def test_policy_option_mistakes_are_reported_with_paths() -> None:
    doc = {
        "listeners": [{"listen": ":1", "upstream": "u"}],
        "upstreams": {
            "u": {"backends": ["http://127.0.0.1:1"],
                  "policy": {"name": "round_robin", "key": "ip", "balance_factor": 2}},
            "v": {"backends": ["http://127.0.0.1:2"],
                  "policy": {"name": "hash", "key": "body", "fallback": "hash"}},
            "w": {"backends": ["http://127.0.0.1:3"],
                  "policy": {"name": "consistent_hash", "balance_factor": 0.5,
                             "algorithm": "jump"}},
        },
    }  # fmt: skip
    with pytest.raises(ConfigError) as exc:
        parse_config(doc)
    problems = exc.value.problems
    expected_prefixes = [
        "upstreams.u.policy.key: applies only to hash and consistent_hash",
        "upstreams.u.policy.balance_factor: applies only to consistent_hash",
        "upstreams.v.policy.key: unknown key source 'body'",
        "upstreams.v.policy.fallback: must be a policy without a key",
        "upstreams.w.policy.algorithm:",
        "upstreams.w.policy.balance_factor: must be above 1.0",
    ]
    for prefix in expected_prefixes:
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)


def test_a_header_key_with_an_underscore_is_refused_because_it_could_never_match() -> None:
    doc = {
        "listeners": [{"listen": ":1", "upstream": "u"}],
        "upstreams": {
            "u": {"backends": ["http://127.0.0.1:1"],
                  "policy": {"name": "consistent_hash", "key": "header:X_User"}},
        },
    }  # fmt: skip
    with pytest.raises(ConfigError) as exc:
        parse_config(doc)
    assert exc.value.problems == [
        "upstreams.u.policy.key: 'header:X_User' never matches: poise drops request header "
        "fields whose name contains '_' (as nginx does by default), so no request reaches the "
        "balancer with it; use the name with '-'"
    ]
    doc["upstreams"]["u"]["policy"]["key"] = "header:X-User"
    assert parse_config(doc).upstreams["u"].policy.key == "header:x-user"


def test_timeouts_drain_idle_is_a_positive_duration() -> None:
    data = minimal()
    assert parse_config(data).timeouts.drain_idle == 1.0
    data["timeouts"] = {"drain_idle": "250ms"}
    assert parse_config(data).timeouts.drain_idle == 0.25
    data["timeouts"] = {"drain_idle": "0s"}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.problems == ["timeouts.drain_idle: must be greater than 0, got '0s'"]
