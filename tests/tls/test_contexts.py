"""Pure pieces of poise.tls: certificate facts, SNI selection, subject formatting, reload."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import ssl
from pathlib import Path

import pytest

from poise.config import parse_config
from poise.config.model import CertificateConfig, ListenerTlsConfig
from poise.tls.certs import read_pem_certificate
from poise.tls.contexts import CertSet, ListenerTls, format_subject, upstream_tls
from tests.tls.certgen import CA


def test_certificate_facts(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    pair = ca.issue("a", ["a.test", "*.b.test", "127.0.0.1"], days=10)
    info = read_pem_certificate(pair.cert.read_bytes())
    assert info.dns_names == ("a.test", "*.b.test")  # the IP address is not a DNS name
    assert info.common_name == "a.test"
    now = dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=9) < info.not_after - now < dt.timedelta(days=11)
    assert not info.expired(now)
    cn_only = read_pem_certificate(ca.issue("c", cn="Only.CN").cert.read_bytes())
    assert cn_only.dns_names == () and cn_only.names == ("only.cn",)
    ca_info = read_pem_certificate(ca.path.read_bytes())
    assert ca_info.names == ("poise test ca",)
    with pytest.raises(ValueError, match="no PEM certificate"):
        read_pem_certificate(b"nothing")
    with pytest.raises(ValueError, match="cannot read the certificate"):
        read_pem_certificate(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----")


def test_select_exact_then_one_level_wildcard_then_default() -> None:
    d, a, w = (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) for _ in range(3))
    certs = CertSet(d, {"a.test": a, "x.w.test": a}, {"w.test": w}, ())
    assert certs.select("a.test") is a
    assert certs.select("A.TEST.") is a
    assert certs.select("x.w.test") is a  # exact beats wildcard
    assert certs.select("y.w.test") is w
    assert certs.select("z.y.w.test") is d  # a wildcard covers one label only
    assert certs.select("w.test") is d
    assert certs.select(None) is d
    assert certs.select("") is d
    assert certs.select("other.test") is d


def test_format_subject() -> None:
    subject = (
        (("countryName", "DE"),),
        (("organizationName", "Ex, Inc."),),
        (("commonName", "alice"), ("userId", "7")),
    )
    assert format_subject(subject) == b"CN=alice+UID=7,O=Ex\\, Inc.,C=DE"
    hostile = ((("commonName", "#a\r\nX-Injected: 1 é "),),)
    text = format_subject(hostile)
    assert b"\r" not in text and b"\n" not in text
    assert text == b"CN=\\#a\\0D\\0AX-Injected: 1 \\C3\\A9\\ "
    assert format_subject(((("1.2.3.4", "x"),),)) == b"1.2.3.4=x"


def test_reload_keeps_serving_while_files_are_missing_or_expired(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    good, old = ca.issue("good", ["r.test"]), ca.issue("old", ["r.test"], expired=True)
    cert, key = tmp_path / "s.crt", tmp_path / "s.key"
    shutil.copyfile(good.cert, cert)
    shutil.copyfile(good.key, key)
    cfg = ListenerTlsConfig((CertificateConfig(str(cert), str(key)),), strict=True)
    tls = ListenerTls("web", cfg)
    before = tls.certs
    assert tls.reload() == "unchanged"
    os.unlink(key)  # mid-rotation: not there yet
    assert tls.reload() == "unchanged"
    assert tls.certs is before
    shutil.copyfile(old.key, key)
    shutil.copyfile(old.cert, cert)
    result = tls.reload()
    assert result.startswith("failed: ") and "expired on" in result
    assert tls.certs is before
    assert tls.reload() == "unchanged"  # reported once, not on every poll
    shutil.copyfile(good.key, key)
    shutil.copyfile(good.cert, cert)
    assert tls.reload() == "reloaded"
    assert tls.certs is not before
    assert tls.statistics()["reload_failures"] == 1


def test_upstream_tls_by_group(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    config = parse_config({
        "listeners": [{"listen": "127.0.0.1:0", "routes": [{"upstream": "a"}]}],
        "upstreams": {
            "a": {"backends": ["https://one.internal", "http://127.0.0.1:2"],
                  "tls": {"ca": str(ca.path)}},
            "b": {"backends": ["http://127.0.0.1:3"]},
            "c": {"backends": ["https://127.0.0.1:4"],
                  "tls": {"server_name": "c.internal", "verify": False}},
            "d": {"dns": {"name": "d.internal", "scheme": "https", "port": 443}},
        },
    })  # fmt: skip
    tls = upstream_tls(config.upstreams)
    assert set(tls) == {"a", "c", "d"}  # b has no https backend (it would get one lazily)
    assert tls["a"].name_for("one.internal") == "one.internal"
    assert tls["a"].context.verify_mode == ssl.CERT_REQUIRED
    c = tls["c"]
    assert c.name_for("127.0.0.1") == "c.internal"
    assert c.context.verify_mode == ssl.CERT_NONE and not c.context.check_hostname
