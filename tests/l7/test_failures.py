"""failures.py: the failure table is what the proxy does.

For each kind of failed attempt, driven on in-memory connections: the client gets the
table's answer (status and message) when no other try is made, the attempt counter and the
answer counter each count once, passive health records the table's reason, and another
backend takes the request exactly when the kind's ``retry_on`` condition is listed.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import pytest
from tests.l7.test_memo import GET, Sink
from tests.l7.test_shortcuts import ConnectLoop

from poise import failures
from poise.admin import metrics
from poise.config import parse_config
from poise.config.resilience import RETRY_CONDITIONS
from poise.failures import AttemptFailure
from poise.l7.client import ClientConnection
from poise.l7.context import Context, Stats
from poise.l7.upstream import UpstreamConnection
from poise.routing import build_table

# how each kind of failure is made to happen on an upstream connection that has the request
CAUSES: dict[str, Callable[[UpstreamConnection], None]] = {
    "reset": lambda up: up.connection_lost(ConnectionResetError()),
    "broken": lambda up: up.data_received(b"HTTP/1.1 2x0 OK\r\n\r\n"),
    "timeout": lambda up: up.on_timeout(),
}
KINDS = [f for f in failures.ATTEMPT_FAILURES if f.outcome in CAUSES]


def scenario(failure: AttemptFailure, retry_on: list[str]) -> tuple[bytes, list[Any], Context]:
    """A GET to a group of two backends whose first attempt fails with ``failure``; the
    second backend answers 200 if it gets the request."""
    loop = ConnectLoop()

    async def go() -> tuple[bytes, list[Any], Context]:
        doc = {
            "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
            "upstreams": {
                "app": {
                    "backends": ["http://127.0.0.1:9", "http://127.0.0.1:10"],
                    "policy": "round_robin",
                    "health_check": {"enabled": False},
                    "passive": {"consecutive_failures": 1},
                    "retry": {"on": retry_on, "attempts": 2},
                }
            },
        }
        config = parse_config(doc)
        table = build_table(config, random.Random(1))
        ctx = Context(config, table, asyncio.get_running_loop())
        client = ClientConnection(ctx, "web")
        sink = Sink()
        client.connection_made(sink)  # type: ignore[arg-type]
        client.data_received(GET)
        for tries in range(2):  # the first attempt fails; a retry, if any, is answered
            for _ in range(200):  # the connect task runs and the request is sent
                await asyncio.sleep(0)
                if client.queue and client.queue[0].conn is not None:
                    break
            else:
                break  # no (further) attempt
            up = client.queue[0].conn
            if tries == 0:
                CAUSES[failure.outcome](up)
            else:
                up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return sink.data(), list(table.groups["app"].outliers.reasons), ctx  # type: ignore[union-attr]

    try:
        return loop.run_until_complete(go())
    finally:
        loop.close()


@pytest.mark.parametrize("failure", KINDS, ids=lambda f: f.outcome)
def test_a_failed_attempt_not_retried_gets_the_tables_answer(failure: AttemptFailure) -> None:
    got, reasons, ctx = scenario(failure, retry_on=[])
    answer = failure.answer
    assert got.startswith(b"HTTP/1.1 %d " % answer.status), got
    assert got.endswith(answer.message.encode() + b"\n")
    counts = ctx.stats.as_dict()
    assert counts[failure.counter] == 1
    assert counts[answer.counter] == 1
    assert counts["retries"] == 0
    assert f"({failure.passive})" in reasons[0]  # passive health ejected it with that reason


@pytest.mark.parametrize("failure", KINDS, ids=lambda f: f.outcome)
def test_a_failed_attempt_is_retried_exactly_when_its_condition_is_listed(
    failure: AttemptFailure,
) -> None:
    got, _, ctx = scenario(failure, retry_on=list(RETRY_CONDITIONS))
    counts = ctx.stats.as_dict()
    assert counts[failure.counter] == 1
    if failure.retry_on:
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"ok")
        assert counts["retries"] == 1 and counts[failure.answer.counter] == 0
    else:  # never retried (a broken response may have been processed)
        assert got.startswith(b"HTTP/1.1 %d " % failure.answer.status)
        assert counts["retries"] == 0


def test_the_table_names_real_counters_conditions_and_metrics() -> None:
    counters = {f.name for f in fields(Stats)}
    for answer in failures.ANSWERS:
        assert answer.counter in counters
        assert metrics._ERRORS[answer.counter] == (answer.kind, str(answer.status))
    for failure in failures.ATTEMPT_FAILURES:
        assert failure.counter in counters
        assert failure.retry_on in (*RETRY_CONDITIONS, "")
        assert failure.answer in failures.ANSWERS
        assert metrics._ATTEMPTS[failure.counter] == failure.outcome
    assert len({a.counter for a in failures.ANSWERS}) == len(failures.ANSWERS)


def test_count_adds_one_to_the_named_counter() -> None:
    stats = Stats()
    stats.count("attempt_resets")
    stats.count("attempt_resets")
    assert stats.attempt_resets == 2 and stats.as_dict()["attempt_timeouts"] == 0


def test_the_table_says_what_the_docs_say() -> None:
    # docs/http.md and failures.py's docstring: the outcome of each kind for a client
    rows = {
        f.outcome: (f.retry_on, f.passive, f.answer.status, f.answer.message)
        for f in failures.ATTEMPT_FAILURES
    }
    assert rows == {
        "connect_error": ("connect", "", 502, "Bad Gateway"),
        "timeout": ("timeout", "timeout", 504, "Gateway Timeout"),
        "reset": ("reset", "reset", 502, "Bad Gateway"),
        "broken": ("", "broken", 502, "Bad Gateway"),
    }
    assert (failures.NO_HEALTHY_BACKEND.status, failures.NO_HEALTHY_BACKEND.message) == (
        503,
        "No healthy server available",
    )
