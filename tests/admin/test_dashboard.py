"""The dashboard in a real headless Chromium, driven over the DevTools protocol: it shows the
routes and backends with their state, updates when a backend dies, and a screenshot is saved
(tests/output/dashboard-*.png, and the test's tmp dir)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from poise.testing import HttpBackend
from tests.integration.support import full, running

pytestmark = pytest.mark.timeout(90)
TOKEN = "dashboard-token-0123456789"
OUTPUT = Path(__file__).resolve().parents[1] / "output"


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "headless_shell"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Page:
    """One page over a DevTools websocket: evaluate JavaScript, take screenshots."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg["result"]
                return result

    async def text(self) -> str:
        r = await self.call("Runtime.evaluate", expression="document.body.innerText")
        return str(r["result"].get("value", ""))

    async def wait_text(self, pattern: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = await self.text()
            if re.search(pattern, text):
                return text
            await asyncio.sleep(0.2)
        raise AssertionError(f"the page never showed {pattern!r}; it shows:\n{text}")

    async def screenshot(self, path: Path) -> None:
        r = await self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(r["data"]))


@contextlib.asynccontextmanager
async def browser(url: str, profile: Path) -> AsyncIterator[Page]:
    from websockets.asyncio.client import connect

    exe = chromium()
    assert exe is not None
    proc = subprocess.Popen(
        [
            exe,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = (await asyncio.to_thread(proc.stderr.readline)).decode(errors="replace")
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
            elif not line and proc.poll() is not None:
                break
        assert port is not None, "chromium did not start its DevTools endpoint"
        async with httpx.AsyncClient() as c:
            targets = (await c.get(f"http://127.0.0.1:{port}/json/list")).json()
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with connect(ws_url, max_size=None) as ws:
            yield Page(ws)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (.ci/run installs it)")
async def test_dashboard_shows_backends_and_follows_a_death(tmp_path: Path) -> None:
    async with HttpBackend("a") as a, HttpBackend("b") as b:
        doc = full([a.url, b.url], health={"interval": "0.3s", "timeout": "0.3s"})
        doc["admin"] = {"listen": "127.0.0.1:0", "token": TOKEN}
        async with running(doc) as (server, url):
            assert server.admin_address is not None
            host, port = server.admin_address
            async with httpx.AsyncClient() as c:  # some traffic for the charts
                for i in range(20):
                    await c.get(f"{url}/{i}")
            page_url = f"http://{host}:{port}/#token={TOKEN}"
            async with browser(page_url, tmp_path / "profile") as page:
                text = await page.wait_text(r"requests/s")
                text = await page.wait_text(re.escape(b.url))
                assert a.url in text and "round_robin" in text
                assert text.count("\tup\t") >= 2, text  # both backends up
                await b.stop()
                text = await page.wait_text(r"down\tconnect refused")
                assert re.search(re.escape(b.url) + r"\tdown\tconnect refused", text), text
                assert re.search(re.escape(a.url) + r"\tup", text), text
                shot = tmp_path / "dashboard.png"
                await page.screenshot(shot)
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                if os.access(OUTPUT.parent, os.W_OK):  # kept for people to look at
                    OUTPUT.mkdir(exist_ok=True)
                    shutil.copy(shot, OUTPUT / "dashboard.png")


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (.ci/run installs it)")
async def test_dashboard_without_the_token_asks_for_it(tmp_path: Path) -> None:
    async with HttpBackend("a") as a:
        doc = full([a.url], health={"enabled": False})
        doc["admin"] = {"listen": "127.0.0.1:0", "token": TOKEN}
        async with running(doc) as (server, _):
            assert server.admin_address is not None
            host, port = server.admin_address
            async with browser(f"http://{host}:{port}/", tmp_path / "profile") as page:
                text = await page.wait_text("admin token is missing or wrong")
                assert "Admin token" in text and a.url not in text


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (.ci/run installs it)")
async def test_dashboard_shows_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "backends.txt"
    async with HttpBackend("a") as a:
        path.write_text(f"{a.url}\n")
        doc = full([], health={"enabled": False})
        doc["upstreams"]["app"] = {"file": str(path), "health_check": {"enabled": False}}
        doc["admin"] = {"listen": "127.0.0.1:0", "token": TOKEN}
        async with running(doc) as (server, _):
            assert server.admin_address is not None
            host, port = server.admin_address
            async with browser(f"http://{host}:{port}/#token={TOKEN}", tmp_path / "p") as page:
                await page.wait_text(re.escape(a.url))
                path.write_text('["http://127.0.0.1:notaport"]')
                text = await page.wait_text(r"SOURCE ERROR: .*notaport")
                assert a.url in text  # the last good list is still shown
