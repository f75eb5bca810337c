"""Logging set-up: what a library logs per call is DEBUG, not INFO, in poise's log."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from poise.logs import setup_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    root, httpx_log = logging.getLogger(), logging.getLogger("httpx")
    handlers, level, httpx_level = root.handlers[:], root.level, httpx_log.level
    httpx_log.setLevel(logging.NOTSET)  # as a fresh process has it
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        httpx_log.setLevel(httpx_level)


def one_request() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
    with httpx.Client(transport=transport) as client:
        client.post("http://127.0.0.1:2379/v3/kv/range", json={})


def test_a_line_per_http_call_is_debug(
    restore_root: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("info")
    one_request()
    logging.getLogger("poise.registry").info("registry store etcd reachable again")
    logging.getLogger("httpx").warning("a library's warning still shows")
    err = capsys.readouterr().err
    assert "HTTP Request" not in err
    assert "reachable again" in err and "a library's warning still shows" in err
    setup_logging("debug")
    one_request()
    lines = [line for line in capsys.readouterr().err.splitlines() if "HTTP Request" in line]
    assert len(lines) == 1 and " DEBUG " in lines[0]
