"""The SDK's pure half: registration bodies, reply errors, policy views."""

from __future__ import annotations

import random
import socket

import pytest

from poise.client.core import (
    RegistrationSpec,
    ServiceView,
    check_reply,
    parse_policy,
    request_key,
)
from poise.errors import InvalidInstance, NotRegistered, RegistryError, RegistryUnreachable
from poise.registry import Instance


def test_registration_defaults_and_body() -> None:
    reg = RegistrationSpec.make("users", 8001, ttl="9s", tags=["a"], meta={"v": "2"})
    assert reg.id == f"users-{socket.gethostname()}-8001"
    assert reg.path == f"/v1/services/users/instances/{reg.id}"
    assert reg.interval == 3.0  # a third of the TTL
    body = reg.body("warning")
    assert body["ttl"] == 9.0 and body["status"] == "warning" and body["tags"] == ["a"]
    assert body["meta"] == {"v": "2"} and body["host"] == "127.0.0.1"
    with pytest.raises(InvalidInstance, match="id"):
        RegistrationSpec.make("users", 1, id="bad id")


def test_replies_become_the_errors_of_the_tree() -> None:
    reg = RegistrationSpec.make("users", 1, id="u1")
    assert check_reply(200, {"x": 1}, "call") == {"x": 1}
    with pytest.raises(InvalidInstance) as bad:
        check_reply(400, {"error": "e", "problems": ["port: no"]}, "register")
    assert bad.value.problems == ["port: no"]
    with pytest.raises(NotRegistered):
        check_reply(404, {"error": "gone", "reregister": True}, "heartbeat", reg)
    with pytest.raises(RegistryUnreachable, match="503"):
        check_reply(503, {"error": "store down"}, "list")
    with pytest.raises(RegistryError, match="401: missing or wrong bearer token"):
        check_reply(401, {"error": "missing or wrong bearer token"}, "register")


def test_request_keys_as_the_proxy_extracts_them() -> None:
    pairs = [(b"X-User", b"ann"), (b"Cookie", b"a=1; sid=xyz")]
    key = parse_policy({"name": "hash", "key": "header:X-User"})
    assert request_key(key, b"/p?q=1", pairs) == b"ann"
    assert request_key(parse_policy({"name": "hash", "key": "cookie:sid"}), b"/", pairs) == b"xyz"
    assert request_key(parse_policy({"name": "hash", "key": "query:q"}), b"/p?q=1", []) == b"1"
    assert request_key(parse_policy({"name": "hash", "key": "uri"}), b"/p?q=1", []) == b"/p?q=1"
    assert request_key(parse_policy("ip_hash"), b"/", pairs) is None  # no client ip here
    assert request_key(parse_policy("round_robin"), b"/", pairs) is None


def test_view_merges_addresses_and_skips_critical_and_draining() -> None:
    def inst(id: str, port: int, **kw: object) -> Instance:
        return Instance("users", id, "127.0.0.1", port, **kw)  # type: ignore[arg-type]

    instances = [
        inst("a", 1), inst("a2", 1, status="critical"),  # same address: one backend, fine
        inst("b", 2, status="critical"), inst("c", 3, weight=0), inst("t", 4, scheme="tcp"),
        inst("d", 5, weight=3),
    ]  # fmt: skip
    view = ServiceView("users", instances, 7, policy=parse_policy("wrr"), rng=random.Random(1))
    assert [b.port for b in view.backends] == [1, 2, 3, 5]  # tcp left out
    assert view.usable == [True, False, False, True]
    picks = [view.candidates(None, {}, 0.0)[0].port for _ in range(40)]
    # the unusable ones' turns go to the next candidate, as in the proxy
    assert set(picks) == {1, 5} and picks.count(5) > 2 * picks.count(1)
    # a backend that refused a connection goes last while ejected
    assert [b.port for b in view.candidates(None, {"127.0.0.1:5": 10.0}, 5.0)][-1] == 5
    assert [b.port for b in view.candidates(None, {"127.0.0.1:5": 10.0}, 11.0)] != []
