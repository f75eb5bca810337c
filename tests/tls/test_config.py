"""TLS configuration: every problem reported at once with its path; expiry is a warning
unless strict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from poise.cli import main
from poise.config import ConfigError, parse_config
from tests.tls.certgen import CA


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path)


def doc(tls: dict[str, Any] | None = None, **listener: Any) -> dict[str, Any]:
    lc: dict[str, Any] = {"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}
    if tls is not None:
        lc["tls"] = tls
    lc.update(listener)
    return {"listeners": [lc], "upstreams": {"app": {"backends": ["http://127.0.0.1:1"]}}}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_valid_listener_tls_is_typed(ca: CA) -> None:
    d, a = ca.issue("d", ["d.test"]), ca.issue("a", ["a.test", "*.a.test"])
    config = parse_config(doc({
        "cert": str(d.cert), "key": str(d.key), "names": ["D.test."],
        "certificates": [{"cert": str(a.cert), "key": str(a.key)}],
        "min_version": "1.3", "ciphers": "ECDHE+AESGCM", "client_ca": str(ca.path),
        "client_auth": "optional", "client_subject_header": "X-Client-Subject",
        "reload_interval": "30s",
    }))  # fmt: skip
    tls = config.listeners[0].tls
    assert tls is not None
    assert [c.names for c in tls.certificates] == [("d.test",), ()]
    assert tls.min_version == "1.3" and tls.client_auth == "optional"
    assert tls.reload_interval == 30.0
    assert config.warnings == ()


def test_unreadable_mismatched_and_not_pem_are_all_reported(ca: CA, tmp_path: Path) -> None:
    a, b = ca.issue("a", ["a.test"]), ca.issue("b", ["b.test"])
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    data = doc({
        "cert": str(tmp_path / "missing.crt"), "key": str(a.key),
        "certificates": [
            {"cert": str(a.cert), "key": str(b.key)},
            {"cert": str(junk), "key": str(a.key)},
            {"cert": str(a.cert), "key": str(junk)},
        ],
    })  # fmt: skip
    data["upstreams"]["app"] = {"backends": ["https://127.0.0.1:1"], "tls": {"ca": str(junk)}}
    found = problems(data)
    assert found[0] == (
        f"listeners[0].tls.cert: cannot read {tmp_path}/missing.crt: No such file or directory"
    )
    assert found[1] == (
        "listeners[0].tls.certificates[0].key: the certificate and the key do not match "
        f"({b.key} for {a.cert})"
    )
    assert found[2].startswith("listeners[0].tls.certificates[1].cert: no PEM certificate found")
    assert found[3].startswith("listeners[0].tls.certificates[2].key: not a PEM certificate")
    assert found[4].startswith("upstreams.app.tls.ca: ")
    assert len(found) == 5


def test_expired_is_a_warning_with_the_date_unless_strict(ca: CA, tmp_path: Path) -> None:
    old = ca.issue("old", ["old.test"], expired=True, days=3)
    tls = {"cert": str(old.cert), "key": str(old.key)}
    config = parse_config(doc(tls))
    assert len(config.warnings) == 1
    warning = config.warnings[0]
    assert warning.startswith(f"listeners[0].tls.cert: certificate {old.cert} expired on 20")
    assert warning.endswith(" UTC")
    found = problems(doc({**tls, "strict": True}))
    assert found == [warning + " (strict: refused)"]
    # `poise check` says OK and prints the warning
    path = tmp_path / "poise.json"
    path.write_text(json.dumps(doc(tls)))
    assert main(["check", "-c", str(path)]) == 0


def test_check_prints_warnings(ca: CA, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = ca.issue("old", ["old.test"], expired=True, days=3)
    path = tmp_path / "poise.json"
    path.write_text(json.dumps(doc({"cert": str(old.cert), "key": str(old.key)})))
    assert main(["check", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert "poise: warning: listeners[0].tls.cert: certificate" in err and "expired on" in err


def test_option_problems(ca: CA) -> None:
    d = ca.issue("d", ["d.test"])
    base = {"cert": str(d.cert), "key": str(d.key)}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**base, "ciphers": "NOPE"}, "listeners[0].tls.ciphers: no cipher matches: 'NOPE'"),
        ({**base, "min_version": "1.1"}, "listeners[0].tls.min_version: must be one of 1.2, 1.3"),
        ({**base, "min_version": "1.3", "max_version": "1.2"},
         "listeners[0].tls.max_version: is below min_version (1.3)"),
        ({**base, "client_subject_header": "X-S"},
         "listeners[0].tls.client_subject_header: needs 'client_ca'"),
        ({**base, "client_ca": str(d.key), "client_subject_header": "X S"},
         "listeners[0].tls.client_ca: "),
        ({**base, "client_ca": "/nope.pem"}, "listeners[0].tls.client_ca: cannot read /nope.pem"),
        ({**base, "names": ["*.*.x"]}, "listeners[0].tls.names: not a host name or '*.' wildcard"),
        ({**base, "names": "a..b"}, "listeners[0].tls.names: not a host name"),
        ({**base, "certs": []}, "listeners[0].tls.certs: unknown key (did you mean 'cert'?)"),
        ({"names": ["a.test"]}, "listeners[0].tls.names: applies to 'cert'"),
        ({}, "listeners[0].tls: needs a certificate"),
        ({"cert": str(d.cert)}, "listeners[0].tls.key: required but missing"),
    ]  # fmt: skip
    for tls, expected in cases:
        found = problems(doc(tls))
        assert any(p.startswith(expected) for p in found), (tls, found)
    found = problems(doc({**base, "client_ca": str(ca.path), "client_subject_header": "Host"}))
    assert found == [
        "listeners[0].tls.client_subject_header: 'Host' is a field poise writes itself; "
        "choose another name"
    ]


def test_upstream_tls_and_redirect_problems(ca: CA) -> None:
    d = ca.issue("d", ["d.test"])
    data = doc()
    data["upstreams"]["app"]["tls"] = {"verify": "yes", "server_name": "*.x", "cert": str(d.cert)}
    data["listeners"].append({"listen": "127.0.0.1:0", "redirect_https": {"status": 303},
                              "upstream": "app"})  # fmt: skip
    data["listeners"].append({"listen": "127.0.0.1:0", "redirect_https": "yes"})
    assert problems(data) == [
        "listeners[1].redirect_https.status: must be 301, 302, 307 or 308, got 303",
        "listeners[1].upstream: a redirect_https listener only redirects",
        "listeners[2].redirect_https: expected true or an object with 'status' and 'port', "
        "got 'yes'",
        "upstreams.app.tls: applies to https:// backends; this upstream has none",
        "upstreams.app.tls.key: required but missing",
        "upstreams.app.tls.verify: expected a boolean (true or false), got string",
        "upstreams.app.tls.server_name: not a host name: '*.x'",
    ]


def test_https_backend_defaults(ca: CA) -> None:
    data = doc()
    data["upstreams"]["app"] = {"backends": ["https://b.internal", "http://127.0.0.1:2"]}
    config = parse_config(data)
    up = config.upstreams["app"]
    assert [(b.scheme, b.port) for b in up.backends] == [("https", 443), ("http", 2)]
    assert up.tls is None
    data["upstreams"]["app"]["tls"] = {"ca": str(ca.path), "server_name": "B.Internal."}
    tls = parse_config(data).upstreams["app"].tls
    assert tls is not None and tls.server_name == "b.internal" and tls.verify


def test_session_resumption_settings_and_their_problems(ca: CA, tmp_path: Path) -> None:
    p = ca.issue("p", ["p.test"])
    pair = {"cert": str(p.cert), "key": str(p.key)}
    tls = parse_config(doc(pair)).listeners[0].tls
    assert tls is not None
    assert (tls.session_resumption, tls.session_ticket_rotation, tls.session_ticket_keys) == (
        True, 3600.0, ()
    )  # fmt: skip
    good, short = tmp_path / "good.key", tmp_path / "short.key"
    good.write_bytes(bytes(80))
    short.write_bytes(bytes(48))
    tls = parse_config(doc({**pair, "session_ticket_keys": [str(good)]})).listeners[0].tls
    assert tls is not None and tls.session_ticket_keys == (str(good),)
    tls = parse_config(doc({**pair, "session_ticket_rotation": "12h"})).listeners[0].tls
    assert tls is not None and tls.session_ticket_rotation == 43200.0
    path = "listeners[0].tls"
    assert problems(doc({**pair, "session_ticket_keys": [str(short), str(tmp_path / "no")]})) == [
        f"{path}.session_ticket_keys[0]: {short}: 48 bytes; a ticket key file holds 80 random "
        f"bytes (openssl rand 80 > {short})",
        f"{path}.session_ticket_keys[1]: {tmp_path / 'no'}: cannot read: No such file or directory",
    ]
    off = {**pair, "session_resumption": False, "session_ticket_rotation": "1h"}
    assert problems(doc(off)) == [
        f"{path}.session_ticket_rotation: has no effect with session_resumption: false"
    ]
    assert problems(doc({**pair, "session_ticket_rotation": "0.5s"})) == [
        f"{path}.session_ticket_rotation: must be at least 1s, got '0.5s'"
    ]
    assert problems(
        doc({**pair, "session_ticket_rotation": "1h", "session_ticket_keys": str(good)})
    ) == [
        f"{path}.session_ticket_rotation: not with session_ticket_keys: the files are the keys "
        "(rotate them by replacing the files)"
    ]
