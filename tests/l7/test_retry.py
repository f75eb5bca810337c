"""Retry decisions (l7/retry.py): RFC 9110 §9.2.2 safety, configured conditions, budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poise.config.model import RetryConfig
from poise.l7 import retry

KEYED = [b"Idempotency-Key", b": ", b"k-1", b"\r\n"]
PLAIN = [b"Content-Type", b": ", b"text/plain", b"\r\n"]


def rep(
    cfg: RetryConfig,
    method: str,
    headers: list[bytes],
    *,
    size: int | None = None,
    kept: bool = True,
) -> bool:
    """repeatable() for a request without a body (``size`` None) or with ``size`` bytes."""
    return retry.repeatable(
        cfg, method, headers, has_body=size is not None, body_kept=kept, body_bytes=size or 0
    )


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"])
def test_idempotent_methods_are_repeatable(method: str) -> None:
    assert rep(RetryConfig(), method, PLAIN)


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT", "PROPFIND"])
def test_other_methods_are_not_even_with_a_key_unless_configured(method: str) -> None:
    assert not rep(RetryConfig(), method, KEYED, size=10)
    keyed = RetryConfig(idempotency_key=True)
    assert rep(keyed, method, KEYED, size=10)
    assert not rep(keyed, method, PLAIN, size=10)


def test_a_body_must_be_kept_and_within_max_body() -> None:
    cfg = RetryConfig(max_body=100)
    assert rep(cfg, "PUT", PLAIN, size=100)
    assert not rep(cfg, "PUT", PLAIN, size=101)
    assert not rep(cfg, "PUT", PLAIN, size=10, kept=False)


def test_listed_conditions_and_statuses() -> None:
    cfg = RetryConfig(on=("reset",))
    assert retry.listed(cfg, frozenset({503}), "reset")
    assert not retry.listed(cfg, frozenset({503}), "timeout")
    assert retry.listed(cfg, frozenset({503}), 503)
    assert not retry.listed(cfg, frozenset({503}), 502)
    assert not retry.listed(RetryConfig(), frozenset(), 503)  # statuses are opt-in


def test_budget_minimum_then_percentage() -> None:
    cfg = RetryConfig(budget_percent=20, budget_min=3)
    assert retry.within_budget(cfg, 2, 0)  # the minimum holds with nothing in flight
    assert not retry.within_budget(cfg, 3, 10)  # 20% of 10 = 2 < 3: the minimum rules
    assert retry.within_budget(cfg, 19, 100)
    assert not retry.within_budget(cfg, 20, 100)


@given(
    percent=st.integers(0, 100),
    minimum=st.integers(0, 50),
    inflight=st.integers(0, 10_000),
    active=st.integers(0, 10_000),
)
def test_budget_is_the_larger_of_minimum_and_share(
    percent: int, minimum: int, inflight: int, active: int
) -> None:
    cfg = RetryConfig(budget_percent=percent, budget_min=minimum)
    allowed = retry.within_budget(cfg, active, inflight)
    assert allowed == (active < minimum or active * 100 < percent * inflight)
