"""Retry decisions, pure (no I/O, no clock): whether a failed try may be sent again, and
whether the retry budget allows one more retry in flight.

RFC 9110 §9.2.2: a request may be repeated automatically only when repeating it is safe,
i.e. its method is idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE), or the client made it
safe to repeat with an ``Idempotency-Key`` (when ``retry.idempotency_key`` allows it). poise
must still hold the whole body to send it again (``retry.max_body`` bounds what it keeps).
A request that provably never reached a backend (its connect failed) is not a repetition at
all; the proxy handles that before asking here.

The budget (Envoy's retry budget, Finagle's ``RetryBudget``): retries in flight may be at
most ``budget_percent`` of the requests in flight, but ``budget_min`` are always allowed, so
a failing fleet sees a bounded extra load instead of a retry storm.
"""

from __future__ import annotations

from poise.config.model import RetryConfig
from poise.l7 import http


def repeatable(
    cfg: RetryConfig,
    method: str,
    headers: list[bytes],
    *,
    has_body: bool,
    body_kept: bool,
    body_bytes: int,
) -> bool:
    """Whether the request may be sent again: safe to repeat, and its body still at hand."""
    if has_body and (not body_kept or body_bytes > cfg.max_body):
        return False
    if method in http.IDEMPOTENT_METHODS:
        return True
    return cfg.idempotency_key and http.has_field(headers, b"idempotency-key")


def listed(cfg: RetryConfig, statuses: frozenset[int], condition: str | int) -> bool:
    """Whether the failure is one the operator retries on: a condition in ``retry.on``
    ("connect", "reset", "timeout") or a response status in ``retry.statuses``."""
    return condition in statuses if isinstance(condition, int) else condition in cfg.on


def within_budget(cfg: RetryConfig, retries_active: int, inflight: int) -> bool:
    """Whether one more retry may start with ``retries_active`` already in flight."""
    return retries_active < max(cfg.budget_min, cfg.budget_percent * inflight / 100)
