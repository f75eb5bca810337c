"""Registration parsing and validation (registry/model.py): every problem named by field."""

from __future__ import annotations

import pytest

from poise.errors import InvalidInstance
from poise.registry.model import Event, Instance, parse_instance, parse_ttl


def test_a_full_registration() -> None:
    i = parse_instance(
        "users",
        "users-1",
        {"host": "10.0.0.5", "port": 8001, "weight": 3, "tags": ["v2"], "meta": {"a": "b"},
         "zone": "eu-1", "ttl": "10s", "scheme": "http"},
    )  # fmt: skip
    assert (i.service, i.id, i.host, i.port, i.weight, i.ttl) == (
        "users", "users-1", "10.0.0.5", 8001, 3, 10.0,
    )  # fmt: skip
    assert i.tags == ("v2",) and dict(i.meta) == {"a": "b"} and i.zone == "eu-1"
    assert i.url == "http://10.0.0.5:8001"
    assert Instance.from_json(i.to_json()) == i


def test_defaults_and_address_alias_and_ipv6() -> None:
    i = parse_instance("users", "u", {"address": "::1", "port": 9000})
    assert (i.host, i.scheme, i.weight, i.ttl, i.status) == ("::1", "http", 1, None, "passing")
    assert i.url == "http://[::1]:9000"


@pytest.mark.parametrize("scheme", ["http", "https", "tcp"])
def test_the_port_is_required(scheme: str) -> None:
    with pytest.raises(InvalidInstance) as e:
        parse_instance("web", "w", {"host": "h", "scheme": scheme})
    assert e.value.problems == ["port: required (1-65535)"]


def test_every_problem_is_listed_with_its_field() -> None:
    with pytest.raises(InvalidInstance) as e:
        parse_instance(
            "Users!", "",
            {"host": "a b", "port": 70000, "weight": -1, "tags": "x", "meta": {"a": 1},
             "ttl": "soon", "status": "fine", "colour": "red"},
        )  # fmt: skip
    fields = [p.split(":", 1)[0] for p in e.value.problems]
    assert fields == [
        "service", "id", "colour", "host", "port", "weight", "tags", "meta", "ttl", "status",
    ]  # fmt: skip
    assert "colour: unknown field" in e.value.problems[2]


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidInstance, match="body: expected a JSON object"):
        parse_instance("users", "u", ["host"])


@pytest.mark.parametrize(
    ("value", "seconds"), [(10, 10.0), ("10s", 10.0), ("500ms", 0.5), ("2m", 120.0), (None, None)]
)
def test_ttl_forms(value: object, seconds: float | None) -> None:
    assert parse_ttl(value) == seconds


@pytest.mark.parametrize("value", ["0s", "2d", True, "nan", -1, 1e9])
def test_bad_ttls(value: object) -> None:
    with pytest.raises(InvalidInstance, match="ttl"):
        parse_ttl(value)


def test_event_json() -> None:
    i = parse_instance("users", "u", {"host": "h", "port": 1})
    assert Event(7, "put", "users", "u", i).to_json()["instance"]["host"] == "h"
    assert Event(8, "delete", "users", "u", reason="expired").to_json() == {
        "revision": 8, "type": "delete", "service": "users", "id": "u", "reason": "expired",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("given", "host"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("users-1.eu.example.com", "users-1.eu.example.com"),
        ("example.com.", "example.com."),
        ("web_1", "web_1"),
        ("localhost", "localhost"),
        ("::1", "::1"),
        ("[2001:db8::5]", "2001:db8::5"),
        ("2001:DB8:0::0005", "2001:db8::5"),  # one spelling per address
        ("a" * 63 + ".example", "a" * 63 + ".example"),
        (".".join(["a" * 63] * 3) + "." + "b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),
    ],
)
def test_hosts_that_are_dns_names_or_ip_addresses(given: str, host: str) -> None:
    assert parse_instance("users", "u", {"host": given, "port": 8001}).host == host


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:20001",  # a port in the host
        "[::1]:8001",
        "a" * 64 + ".example",  # a label over 63 characters
        "a" * 300,
        ".".join(["a" * 63] * 4),  # 255 characters in all
        "999.1.1.1",
        "1.2.3",
        "010.0.0.1",
        "a..b",
        "-a.example",
        "a-.example",
        "[users.example]",
        "fe80::1%eth0",
        "::1::2",
        "ex ample",
        "ex/ample",
        "exämple",
        "",
        5,
        None,
    ],
)
def test_hosts_that_are_neither_are_refused(host: object) -> None:
    with pytest.raises(InvalidInstance) as e:
        parse_instance("users", "u", {"host": host, "port": 8001})
    assert [p.split(":", 1)[0] for p in e.value.problems] == ["host"]
    assert "is not a DNS name" in e.value.problems[0]


def test_a_host_with_a_port_gets_a_hint() -> None:
    with pytest.raises(InvalidInstance, match=r"\(the port goes in port\)"):
        parse_instance("users", "u", {"host": "127.0.0.1:20001", "port": 20001})


@pytest.mark.parametrize("iid", ["-a", "_a", ".a", "a" * 129, ""])
def test_the_id_error_states_every_rule(iid: str) -> None:
    with pytest.raises(InvalidInstance) as e:
        parse_instance("users", iid, {"host": "h", "port": 1})
    assert e.value.problems == [
        f"id: {iid!r} is not an instance id (letters, digits, '.', '_', ':', '@', '-'; "
        "1-128 characters, starting with a letter or digit)"
    ]
