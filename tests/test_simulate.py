from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from poise.cli import main
from poise.config import parse_config
from poise.simulate import simulate

URLS = ["http://127.0.0.1:5001", "http://127.0.0.1:5002", "http://127.0.0.1:5003"]


def config(policy: Any, backends: list[Any] | None = None) -> Any:
    return parse_config({
        "listeners": [{"listen": ":8080", "upstream": "api"}],
        "upstreams": {"api": {"backends": backends or URLS, "policy": policy}},
    })  # fmt: skip


def test_round_robin_shares_equally() -> None:
    shares = simulate(config("round_robin"), "api", 9000, {})
    assert [s.requests for s in shares] == [3000, 3000, 3000]


def test_weights_show_in_the_shares() -> None:
    backends = [{"url": URLS[0], "weight": 3}, URLS[1], URLS[2]]
    shares = simulate(config("weighted_round_robin", backends), "api", 5000, {})
    assert [s.requests for s in shares] == [3000, 1000, 1000]


@pytest.mark.parametrize("policy", ["peak_ewma", "least_conn", "p2c"])
def test_a_slow_backend_gets_less_under_load_aware_policies(policy: str) -> None:
    shares = simulate(config(policy), "api", 10000, {"127.0.0.1:5002": 50.0})
    assert shares[1].fraction < 0.2
    assert shares[1].requests > 0


def test_least_conn_weights_count_when_backends_are_mostly_idle() -> None:
    """Issue #23: with 5002 slow, weight 5 on 5001 must give it more than 5003 (weight 1),
    not less (was 38% against 60%): idle ties go by smooth WRR."""
    backends = [{"url": URLS[0], "weight": 5}, {"url": URLS[1]}, {"url": URLS[2]}]
    shares = simulate(config("least_conn", backends), "api", 10000, {"127.0.0.1:5002": 50.0})
    assert shares[0].requests > 2 * shares[2].requests
    assert shares[1].fraction < 0.05


def test_hash_spreads_users() -> None:
    shares = simulate(config("ip_hash"), "api", 10000, {})
    assert all(0.2 < s.fraction < 0.5 for s in shares)


def test_cli_prints_a_bar_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        "listeners": [{"listen": ":8080", "upstream": "api"}],
        "upstreams": {"api": {"backends": URLS, "policy": "least_conn"}},
    }))  # fmt: skip
    assert main(["simulate", "-c", str(path), "--requests", "3000",
                 "--latency", "127.0.0.1:5003=40"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "policy least_conn, 3000 requests" in out
    assert out.count("#") > 20
    with pytest.raises(SystemExit):
        main(["simulate", "-c", str(path), "--latency", "nonsense"])


@pytest.mark.parametrize(
    ("configured", "given"),
    [("localhost", "127.0.0.1"), ("127.0.0.1", "localhost"), ("LocalHost", "127.0.0.1")],
)
def test_a_latency_matches_the_backend_however_loopback_is_spelled(
    configured: str, given: str
) -> None:
    urls = [f"http://{configured}:{port}" for port in (5001, 5002, 5003)]
    slow = simulate(config("least_conn", urls), "api", 10000, {f"{given}:5002": 50.0})
    even = simulate(config("least_conn", urls), "api", 10000, {})
    assert slow[1].fraction < 0.2 < even[1].fraction


def test_a_latency_for_no_backend_is_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        "listeners": [{"listen": ":8080", "upstream": "api"}],
        "upstreams": {"api": {"backends": URLS, "policy": "least_conn"}},
    }))  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "-c", str(path), "--latency", "10.0.0.9:5002=50",
              "--latency", "127.0.0.1:5003=40"])  # fmt: skip
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--latency: upstream 'api' has no backend '10.0.0.9:5002'" in err
    assert "(its backends: 127.0.0.1:5001, 127.0.0.1:5002, 127.0.0.1:5003)" in err
