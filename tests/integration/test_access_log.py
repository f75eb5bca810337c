"""The access log end to end: JSON lines and the combined format, written to a file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from poise.config import parse_config
from poise.errors import ConfigError
from poise.testing import HttpBackend, ScriptedBackend
from tests.integration.support import full, running

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("wire_hub")]


def doc(backends: list[str], access: Any) -> dict[str, Any]:
    return full(backends, health={"enabled": False}, log={"access": access})


async def test_json_lines_for_relayed_and_local_answers(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    async with (
        HttpBackend("a") as a,
        running(doc([a.url, "http://127.0.0.1:1"], {"path": str(path)})) as (_, url),
        httpx.AsyncClient() as c,
    ):
        for i in range(4):
            await c.get(f"{url}/item/{i}?q=1", headers={"User-Agent": "t"})
    # the server stopped: everything is flushed
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 4
    first = lines[0]
    assert set(first) == {
        "time",
        "client",
        "method",
        "path",
        "status",
        "bytes",
        "backend",
        "attempts",
        "duration_ms",
        "end",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert {line["path"] for line in lines} == {f"/item/{i}?q=1" for i in range(4)}
    assert all(line["status"] == 200 and line["end"] == "ok" for line in lines)
    assert all(line["backend"] == a.url.split("//")[1] for line in lines)
    # round robin sent some to the dead backend first: the connect failed, they were retried
    attempts = [line["attempts"] for line in lines]
    assert set(attempts) <= {1, 2} and 2 in attempts
    assert all(line["client"] == "127.0.0.1" and line["bytes"] == 2 for line in lines)


async def test_a_local_error_and_the_combined_format(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access = {"path": str(path), "format": "combined"}
    async with running(doc(["http://127.0.0.1:1"], access)) as (_, url), httpx.AsyncClient() as c:
        r = await c.get(url + "/x", headers={"User-Agent": 'say "hi"', "Referer": "/r"})
        assert r.status_code == 503  # the only backend refused the connection
    (line,) = path.read_text().splitlines()
    assert re.fullmatch(
        r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /x HTTP/1\.1" 503 - '
        r'"/r" "say %22hi%22"',
        line,
    ), line


async def test_a_504_names_the_backend_that_timed_out(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    silent = ScriptedBackend(lambda data: None, name="silent")
    async with silent:
        cfg = doc([silent.url], {"path": str(path)})
        cfg["timeouts"] = {"upstream_response": "300ms"}
        async with running(cfg) as (_, url), httpx.AsyncClient() as c:
            assert (await c.get(url + "/slow")).status_code == 504
    (line,) = [json.loads(text) for text in path.read_text().splitlines()]
    assert line["status"] == 504 and line["end"] == "local"
    assert line["backend"] == silent.url.split("//")[1]
    assert line["attempts"] == 1


async def test_sampling_keeps_a_share(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    async with (
        HttpBackend("a") as a,
        running(doc([a.url], {"path": str(path), "sample": 0.25})) as (_, url),
        httpx.AsyncClient() as c,
    ):
        for i in range(400):
            await c.get(f"{url}/{i}")
    n = len(path.read_text().splitlines())
    assert 40 <= n <= 160, n  # 100 expected; far outside these bounds is a bug, not chance


def test_access_log_config_errors() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(doc(["http://a:1"], {"format": "xml", "sample": 0, "colour": 1}))
    text = str(e.value)
    for key in ("log.access.format", "log.access.sample", "log.access.colour"):
        assert key in text
