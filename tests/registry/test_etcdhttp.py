"""The etcd gateway's outage bookkeeping (poise/registry/etcdhttp.py), with the members'
answers scripted: one failure and one recovery are each logged once per outage, whichever
notices the recovery first (a call that was already retrying, or the background probe)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from poise.registry import etcdhttp
from poise.registry.etcdhttp import EtcdGateway


async def test_a_recovery_seen_by_a_call_in_flight_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = EtcdGateway(["http://127.0.0.1:9"], timeout=0.3, attempt_timeout=0.05, probe={})
    probe_ok = asyncio.Event()
    answer = asyncio.Event()  # the slow answer to the call in flight

    async def probe_attempt(*args: Any, **kw: Any) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        if not probe_ok.is_set():
            raise etcdhttp._Retry("no answer")
        return {}

    async def failing(endpoint: str, left: float) -> str:
        await asyncio.sleep(0.01)
        raise etcdhttp._Retry("no answer")

    async def slow(endpoint: str, left: float) -> str:
        await answer.wait()  # asked before the outage was known, answered after
        return "ok"

    monkeypatch.setattr(gw, "_attempt", probe_attempt)
    try:
        with caplog.at_level(logging.INFO, logger="poise"):
            in_flight = asyncio.create_task(gw._failover(slow))
            with pytest.raises(Exception, match="unavailable"):
                await gw._failover(failing)
            assert gw.down_since is not None  # known down: the probe runs
            answer.set()  # the call in flight hears etcd first ...
            assert await in_flight == "ok"
            assert gw.down_since is None
            probe_ok.set()  # ... and the probe, later, says nothing more
            await asyncio.sleep(0.3)
        said = [r.getMessage() for r in caplog.records if r.name.startswith("poise")]
        assert sum("answers again" in m for m in said) == 1, said
        assert sum("failed" in m for m in said) == 1, said
        assert await gw._failover(slow) == "ok"  # up: calls go through
    finally:
        await gw.close()
