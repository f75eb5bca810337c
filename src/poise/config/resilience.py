"""The resilience sections of an upstream: passive health, retries, request limits, and the
health-check options beyond the basic probe. Same conventions as ``load``: every problem is
reported with its dotted path, and an invalid value falls back to the default after being
reported (the load fails anyway)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from poise.config.checks import (
    Checker,
    check_bool,
    check_str,
    int_in,
    key_path,
    positive_duration,
)
from poise.config.model import PassiveConfig, RetryConfig, UpstreamLimitsConfig
from poise.config.values import describe_type, parse_duration, parse_status_range

PASSIVE_KEYS = (
    "enabled",
    "consecutive_failures",
    "statuses",
    "base_ejection",
    "max_ejection",
    "max_ejected_percent",
    "retry_after",
)
RETRY_KEYS = (
    "attempts",
    "on",
    "per_try_timeout",
    "timeout",
    "idempotency_key",
    "budget_percent",
    "budget_min",
    "max_body",
)
LIMITS_KEYS = ("max_requests_per_backend", "max_requests", "max_pending", "queue_timeout")
RETRY_CONDITIONS = ("connect", "reset", "timeout")
BACKEND_STATES = ("enabled", "drain", "maint")
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FORBIDDEN_PROBE_FIELDS = ("host", "content-length", "transfer-encoding", "connection")


def status_ranges(c: Checker, value: object, path: str) -> tuple[tuple[int, int], ...] | None:
    """200, "500-599", or a list of them; None after reporting a problem."""
    if not isinstance(value, list | tuple):
        single = c.check(value, path, parse_status_range)
        return None if single is None else (single,)
    ranges = [c.check(item, f"{path}[{i}]", parse_status_range) for i, item in enumerate(value)]
    if None in ranges:
        return None
    return tuple(r for r in ranges if r is not None)


def non_negative_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    return seconds


def check_fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"expected a fraction from 0 up to (not including) 1, got {value!r}")
    return float(value)


def check_probe_headers(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected an object of header fields, got {describe_type(value)}")
    out = []
    for name, v in value.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"not a header field name: {name!r}")
        if name.lower() in _FORBIDDEN_PROBE_FIELDS:
            hint = " (use health_check.host)" if name.lower() == "host" else ""
            raise ValueError(f"{name!r} is set by poise and cannot be given here{hint}")
        if not isinstance(v, str) or any(c in v for c in "\r\n\0") or not v.isascii():
            raise ValueError(f"header {name!r}: expected a single-line ASCII string, got {v!r}")
        out.append((name, v.strip()))
    return tuple(out)


def check_regex(value: object) -> str:
    text = check_str(value)
    try:
        re.compile(text.encode("utf-8"))
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return text


def passive(c: Checker, value: object, path: str) -> PassiveConfig:
    default = PassiveConfig()
    if isinstance(value, bool):  # "passive": false
        return PassiveConfig(enabled=value)
    obj = c.mapping(value, path, PASSIVE_KEYS) if value is not None else None
    if obj is None:
        return default
    statuses = default.statuses
    if "statuses" in obj:
        statuses = status_ranges(c, obj["statuses"], key_path(path, "statuses")) or ()
        for lo, _ in statuses:
            if lo < 500:
                c.error(
                    key_path(path, "statuses"),
                    f"only 5xx responses can count as failures, got {lo}",
                )
                break
    base = c.field(obj, "base_ejection", path, positive_duration, default.base_ejection)
    cap = c.field(obj, "max_ejection", path, positive_duration, default.max_ejection)
    if cap < base:
        c.error(
            key_path(path, "max_ejection"),
            f"must not be shorter than base_ejection ({base:g}s), got {cap:g}s",
        )
    return PassiveConfig(
        enabled=c.field(obj, "enabled", path, check_bool, default.enabled),
        consecutive_failures=c.field(
            obj, "consecutive_failures", path, int_in(1), default.consecutive_failures
        ),
        statuses=statuses,
        base_ejection=base,
        max_ejection=cap,
        max_ejected_percent=c.field(
            obj, "max_ejected_percent", path, int_in(0, 100), default.max_ejected_percent
        ),
        retry_after=c.field(obj, "retry_after", path, check_bool, default.retry_after),
    )


def _retry_on(c: Checker, value: object, path: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """["connect", "reset", "timeout", 503, "502"] -> conditions and statuses."""
    if not isinstance(value, list | tuple):
        c.error(path, f"expected a list such as ['connect', 'reset', 503], got {value!r}")
        return RetryConfig().on, ()
    conditions: list[str] = []
    statuses: list[int] = []
    for i, item in enumerate(value):
        ipath = f"{path}[{i}]"
        if isinstance(item, str) and item.lower() in RETRY_CONDITIONS:
            conditions.append(item.lower())
            continue
        code = None
        if isinstance(item, int) and not isinstance(item, bool):
            code = item
        elif isinstance(item, str) and item.isdigit():
            code = int(item)
        if code is None:
            c.error(
                ipath,
                f"expected one of {', '.join(RETRY_CONDITIONS)} or a 5xx status, got {item!r}",
            )
        elif not 500 <= code <= 599:
            c.error(ipath, f"only 5xx responses can be retried, got {code}")
        else:
            statuses.append(code)
    return tuple(dict.fromkeys(conditions)), tuple(dict.fromkeys(statuses))


def retry(c: Checker, value: object, path: str) -> RetryConfig:
    default = RetryConfig()
    if value is False:  # "retry": false
        return RetryConfig(attempts=1)
    obj = c.mapping(value, path, RETRY_KEYS) if value is not None else None
    if obj is None:
        return default
    on, statuses = default.on, default.statuses
    if "on" in obj:
        on, statuses = _retry_on(c, obj["on"], key_path(path, "on"))
    per_try = None
    if "per_try_timeout" in obj:
        per_try = c.check(
            obj["per_try_timeout"], key_path(path, "per_try_timeout"), positive_duration
        )
    total = None
    if "timeout" in obj:
        total = c.check(obj["timeout"], key_path(path, "timeout"), positive_duration)
    return RetryConfig(
        attempts=c.field(obj, "attempts", path, int_in(1, 10), default.attempts),
        on=on,
        statuses=statuses,
        per_try_timeout=per_try,
        timeout=total,
        idempotency_key=c.field(obj, "idempotency_key", path, check_bool, default.idempotency_key),
        budget_percent=c.field(obj, "budget_percent", path, int_in(0, 100), default.budget_percent),
        budget_min=c.field(obj, "budget_min", path, int_in(0), default.budget_min),
        max_body=c.field(obj, "max_body", path, int_in(0), default.max_body),
    )


def upstream_limits(c: Checker, value: object, path: str) -> UpstreamLimitsConfig:
    default = UpstreamLimitsConfig()
    obj = c.mapping(value, path, LIMITS_KEYS) if value is not None else None
    if obj is None:
        return default
    return UpstreamLimitsConfig(
        max_requests_per_backend=c.field(obj, "max_requests_per_backend", path, int_in(0), 0),
        max_requests=c.field(obj, "max_requests", path, int_in(0), 0),
        max_pending=c.field(obj, "max_pending", path, int_in(0), default.max_pending),
        queue_timeout=c.field(obj, "queue_timeout", path, positive_duration, default.queue_timeout),
    )


def check_percent(value: object) -> int:
    return int_in(0, 100)(value)


def check_backend_state(value: object) -> str:
    text = check_str(value).lower()
    if text not in BACKEND_STATES:
        raise ValueError(f"must be one of {', '.join(BACKEND_STATES)}, got {value!r}")
    return text
