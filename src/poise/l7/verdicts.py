"""What a failed or failing attempt means: whether the request may go to another backend,
what passive health records, and the verdict on a response status.

Shared by the two sides of the proxy without either importing the other: the upstream
protocol asks ``judge_status`` about a response head, and ``attempts.py`` (the client's cold
paths, which also starts upstream connections) asks ``may_retry`` and reports through
``passive_failure``. No I/O: counters and the health state only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from poise.l7 import http
from poise.l7 import retry as retry_rules
from poise.l7.request import field_list

if TYPE_CHECKING:
    from poise.l7.context import Context
    from poise.l7.request import Exchange
    from poise.models import Backend
    from poise.routing import Group


def may_retry(ctx: Context, ex: Exchange, condition: str | int, *, client_closed: bool) -> bool:
    """Whether ``ex`` may go to another backend after ``condition`` (a ``retry.on``
    condition of failures.py, or a response status). RFC 9110 §9.2.2: only a request that
    is safe to repeat (an idempotent method, or an Idempotency-Key when allowed) whose body
    poise still holds; within the attempts, to a backend not yet tried, and within the retry
    budget."""
    group = ex.group
    if group is None or ex.response_started or client_closed:
        return False
    cfg = group.config.retry
    if len(ex.tried) >= cfg.attempts or not retry_rules.listed(
        cfg, group.retry_statuses, condition
    ):
        return False
    if not retry_rules.repeatable(
        cfg,
        ex.method.decode(),
        field_list(ex),
        has_body=ex.has_body,
        body_kept=ex.kept is not None,
        body_bytes=ex.body_bytes,
    ):
        return False
    if ex.until and ctx.clock() >= ex.until:  # retry.timeout: no time left for another try
        return False
    current = ctx.table.groups.get(group.name, group)
    if not any(current.up[b.index] and b not in ex.tried for b in current.backends):
        return False
    if not ex.retrying and not retry_rules.within_budget(cfg, ctx.retries_active, ctx.inflight):
        ctx.stats.retries_over_budget += 1
        return False
    return True


def passive_failure(
    ctx: Context, group: Group, backend: Backend, reason: str, *, connection: bool = True
) -> None:
    """Passive health: count a failure of ``backend``; route around it once ejected.
    ``connection`` is False for a failure status (see ``Outliers.probe_passed``)."""
    outliers = group.outliers
    # the loop's clock rather than the coarse ctx.now: when an ejection began matters
    # to Outliers.probe_passed (failures are off the fast path)
    if outliers is not None and outliers.failure(
        backend.index, ctx.loop.time(), reason, connection=connection
    ):
        ctx.stats.ejections += 1
        ctx.on_ejected(group.name, backend.index, outliers)


def judge_status(
    ctx: Context,
    ex: Exchange,
    backend: Backend,
    status: int,
    low_head: bytes,
    *,
    forwarded: bool,
    client_closed: bool,
) -> bool:
    """Passive health's verdict on a response status from ``backend`` (``low_head``: its
    fields, lower-cased, for Retry-After), and whether to retry instead of forwarding it:
    a status listed in retry.on, before anything reached the client (``forwarded``)."""
    group = ex.group
    assert group is not None
    o = group.outliers
    i = backend.index
    if o is not None:
        if status in o.statuses:
            passive_failure(ctx, group, backend, f"status {status}", connection=False)
        elif status == 503 and b"\r\nretry-after:" in low_head:
            seconds = http.retry_after_seconds(http.field_value(low_head, b"retry-after"))
            if seconds is not None and o.retry_after(i, ctx.now, seconds):
                ctx.stats.ejections += 1
                ctx.on_ejected(group.name, i, o)
        elif o.streak[i]:
            o.success(i)
    return (
        status in group.retry_statuses
        and not forwarded
        and may_retry(ctx, ex, status, client_closed=client_closed)
    )
