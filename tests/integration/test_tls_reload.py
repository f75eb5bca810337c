"""Certificate reload: the API and the file watch swap the certificate for new handshakes,
connections already open keep working, and a broken new file leaves the old one in use."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from poise.testing import HttpBackend, echo_handler
from tests.integration.support import running
from tests.tls.certgen import CA, Pair
from tests.tls.helpers import TlsClient, client_context, get

# every test runs with the C record engine and with its twin (tests/tls/helpers.py)
pytestmark = pytest.mark.usefixtures("tls_engine", "wire_hub")


def install(src: Pair, cert: Path, key: Path) -> None:
    """Replace the served files the way deploy tools do: write aside, then rename."""
    for s, d in ((src.key, key), (src.cert, cert)):
        tmp = d.with_suffix(".new")
        shutil.copyfile(s, tmp)
        os.replace(tmp, d)


def listener_doc(backend: str, cert: Path, key: Path, interval: str) -> dict[str, Any]:
    tls = {"cert": str(cert), "key": str(key), "reload_interval": interval}
    return {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app", "tls": tls}],
        "upstreams": {"app": {"backends": [backend]}},
    }


async def test_reload_api_swaps_the_certificate_and_keeps_old_connections(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    old, new = ca.issue("old", ["reload.test"]), ca.issue("new", ["reload.test"])
    cert, key = tmp_path / "served.crt", tmp_path / "served.key"
    install(old, cert, key)
    ctx = client_context(ca)
    async with (
        HttpBackend("b1", echo_handler) as backend,
        running(listener_doc(backend.url, cert, key, "0")) as (server, _),
    ):
        host, port = server.addresses["web"]
        url = f"https://{host}:{port}"
        kept = await TlsClient.connect(url, ctx, "reload.test")
        try:
            assert (await kept.request()).status == 200
            assert kept.serial == old.serial
            install(new, cert, key)
            assert server.reload_certificates() == {"web": "reloaded"}
            _, serial = await get(url, ctx, "reload.test")
            assert serial == new.serial
            # the connection made before the reload goes on, with its certificate
            assert (await kept.request()).status == 200
            assert kept.serial == old.serial
            # a broken update (a key that does not match) is refused; new stays in use
            bad = ca.issue("bad", ["reload.test"])
            shutil.copyfile(old.key, bad.key)
            install(bad, cert, key)
            result = server.reload_certificates()["web"]
            assert result.startswith("failed: ") and "do not match" in result
            _, serial = await get(url, ctx, "reload.test")
            assert serial == new.serial
            stats = server.statistics()["tls"]["web"]
            assert stats["reloads"] == 1 and stats["reload_failures"] == 1
        finally:
            await kept.close()


async def test_file_watch_picks_up_a_renewed_certificate(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    old, new = ca.issue("old", ["watch.test"]), ca.issue("new", ["watch.test"])
    cert, key = tmp_path / "served.crt", tmp_path / "served.key"
    install(old, cert, key)
    ctx = client_context(ca)
    async with (
        HttpBackend("b1", echo_handler) as backend,
        running(listener_doc(backend.url, cert, key, "50ms")) as (server, _),
    ):
        host, port = server.addresses["web"]
        url = f"https://{host}:{port}"
        _, serial = await get(url, ctx, "watch.test")
        assert serial == old.serial
        install(new, cert, key)
        deadline = time.monotonic() + 10
        while True:
            _, serial = await get(url, ctx, "watch.test")
            if serial == new.serial:
                break
            assert time.monotonic() < deadline, "the new certificate was not picked up"
            await asyncio.sleep(0.05)
        assert server.statistics()["tls"]["web"]["reloads"] >= 1


async def test_config_reload_changes_certificates_and_backend_tls(tmp_path: Path) -> None:
    """A config reload (Server.reload) takes new certificate files and names in place and
    new backend TLS settings; versions, ciphers and client verification need a restart."""
    from poise.config import parse_config
    from poise.errors import ConfigError
    from tests.tls.helpers import server_context

    ca = CA(tmp_path)
    (tmp_path / "o").mkdir()
    other = CA(tmp_path / "o", "other CA")
    one, two = ca.issue("one", ["one.test"]), ca.issue("two", ["two.test"])
    backend_pair = ca.issue("backend", ["127.0.0.1"])
    async with HttpBackend("b1", ssl_context=server_context(backend_pair)) as backend:

        def doc(pair: Pair, ca_path: Path, **tls: Any) -> dict[str, Any]:
            d = listener_doc(backend.url, pair.cert, pair.key, "0")
            d["listeners"][0]["tls"].update(tls)
            d["upstreams"]["app"].update(
                {"tls": {"ca": str(ca_path)}, "health_check": {"enabled": False}}
            )
            return d

        async with running(doc(one, other.path)) as (server, _):
            host, port = server.addresses["web"]
            url = f"https://{host}:{port}"
            ctx = client_context(ca)

            def same_port(d: dict[str, Any]) -> Any:
                d["listeners"][0]["listen"] = f"{host}:{port}"
                return parse_config(d)

            reply, serial = await get(url, ctx, "one.test")
            assert serial == one.serial and reply.status == 502  # backend CA unknown
            changed = await server.reload(same_port(doc(two, ca.path)))
            assert changed["changed"] == ["app"]
            reply, serial = await get(url, ctx, "two.test")
            assert serial == two.serial and reply.status == 200
            with pytest.raises(ConfigError) as e:
                await server.reload(same_port(doc(two, ca.path, min_version="1.3")))
            assert "listeners.web.tls: changing versions" in str(e.value)
            _, serial = await get(url, ctx, "two.test")
            assert serial == two.serial
