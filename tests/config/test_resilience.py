"""Config of the resilience sections: passive, retry, limits, backend states, health extras."""

from __future__ import annotations

from typing import Any

import pytest

from poise.config import ConfigError, parse_config
from poise.config.model import PassiveConfig, RetryConfig, UpstreamLimitsConfig


def doc(**upstream: Any) -> dict[str, Any]:
    backends = upstream.pop("backends", ["http://127.0.0.1:5001", "http://127.0.0.1:5002"])
    return {
        "listeners": [{"listen": ":8080", "upstream": "api"}],
        "upstreams": {"api": {"backends": backends, **upstream}},
    }


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_defaults() -> None:
    up = parse_config(doc()).upstreams["api"]
    assert up.passive == PassiveConfig()
    assert up.retry == RetryConfig()
    assert up.retry.on == ("connect", "reset", "timeout") and up.retry.attempts == 3
    assert up.limits == UpstreamLimitsConfig()
    assert up.panic_threshold == 0 and up.slow_start == 0.0  # panic mode is off by default
    assert [b.state for b in up.backends] == ["enabled", "enabled"]


def test_seed_format_gets_the_same_defaults() -> None:
    config = parse_config({"port": ":8080", "servers": ["http://localhost:5001"]})
    up = config.upstreams["default"]
    assert up.retry == RetryConfig() and up.passive == PassiveConfig()


def test_full_sections_are_read() -> None:
    up = parse_config(
        doc(
            backends=["http://127.0.0.1:5001", {"url": "http://127.0.0.1:5002", "state": "Drain"}],
            passive={"consecutive_failures": 3, "statuses": ["500-504", 507],
                     "base_ejection": "10s", "max_ejection": "1m", "max_ejected_percent": 30,
                     "retry_after": False},
            retry={"attempts": 2, "on": ["reset", 503, "502"], "per_try_timeout": "1500ms",
                   "timeout": "4s", "idempotency_key": True, "budget_percent": 10,
                   "budget_min": 1, "max_body": 1024},
            limits={"max_requests_per_backend": 5, "max_requests": 8, "max_pending": 3,
                    "queue_timeout": "2s"},
            panic_threshold=0,
            slow_start="30s",
        )
    ).upstreams["api"]  # fmt: skip
    assert up.backends[1].state == "drain"
    assert up.passive == PassiveConfig(True, 3, ((500, 504), (507, 507)), 10.0, 60.0, 30, False)
    assert up.retry == RetryConfig(2, ("reset",), (503, 502), 1.5, 4.0, True, 10, 1, 1024)
    assert up.limits == UpstreamLimitsConfig(5, 8, 3, 2.0)
    assert up.panic_threshold == 0 and up.slow_start == 30.0


def test_switches_off() -> None:
    up = parse_config(doc(passive=False, retry=False)).upstreams["api"]
    assert not up.passive.enabled
    assert up.retry.attempts == 1


def test_every_problem_is_reported_with_its_path() -> None:
    problems = problems_of(
        doc(
            backends=[{"url": "http://127.0.0.1:5001", "state": "off"}],
            passive={"statuses": [404], "base_ejection": "1m", "max_ejection": "10s",
                     "consecutive": 3},
            retry={"on": ["connect", 404, "sometimes"], "attempts": 0, "timeout": "soon"},
            limits={"max_pending": -1, "queue_timeout": "0s"},
            panic_threshold=150,
            slow_start="-1s",
        )
    )  # fmt: skip
    expected = [
        "upstreams.api.backends[0].state: must be one of enabled, drain, maint, got 'off'",
        "upstreams.api.passive.consecutive: unknown key (did you mean 'consecutive_failures'?)",
        "upstreams.api.passive.statuses: only 5xx responses can count as failures, got 404",
        "upstreams.api.passive.max_ejection: must not be shorter than base_ejection (60s), got 10s",
        "upstreams.api.retry.on[1]: only 5xx responses can be retried, got 404",
        "upstreams.api.retry.on[2]: expected one of connect, reset, timeout or a 5xx status, "
        "got 'sometimes'",
        "upstreams.api.retry.attempts: must be between 1 and 10, got 0",
        "upstreams.api.limits.max_pending: must be at least 0, got -1",
        "upstreams.api.panic_threshold: must be between 0 and 100, got 150",
    ]
    for line in expected:
        assert line in problems, (line, problems)
    assert any(p.startswith("upstreams.api.limits.queue_timeout:") for p in problems)
    assert any(p.startswith("upstreams.api.retry.timeout:") for p in problems)
    assert any(p.startswith("upstreams.api.slow_start:") for p in problems)


def test_health_check_extras() -> None:
    hc = parse_config(
        doc(health_check={"headers": {"X-Probe": "poise", "Accept": "text/plain"},
                          "body": "ok|ready", "port": 9100, "jitter": 0.2,
                          "unhealthy_interval": "500ms", "history": 20})
    ).upstreams["api"].health_check  # fmt: skip
    assert hc.headers == (("X-Probe", "poise"), ("Accept", "text/plain"))
    assert hc.body == "ok|ready" and hc.port == 9100 and hc.jitter == 0.2
    assert hc.unhealthy_interval == 0.5 and hc.history == 20


def test_health_check_extras_problems() -> None:
    problems = problems_of(
        doc(health_check={"headers": {"Host": "x", "Bad Name": "y"}, "body": "(",
                          "port": 70000, "jitter": 1.5, "history": 0})
    )  # fmt: skip
    text = "\n".join(problems)
    assert "health_check.headers: 'Host' is set by poise" in text
    assert "health_check.body: not a valid regular expression" in text
    assert "health_check.port: must be between 1 and 65535, got 70000" in text
    assert "health_check.jitter: expected a fraction" in text
    assert "health_check.history: must be between 1 and 1000, got 0" in text
    tcp = problems_of(doc(health_check={"type": "tcp", "path": "/x", "body": "ok"}))
    assert "upstreams.api.health_check.path: applies only to http checks, not to type 'tcp'" in tcp
    assert "upstreams.api.health_check.body: applies only to http checks, not to type 'tcp'" in tcp
