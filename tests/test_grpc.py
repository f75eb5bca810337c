"""``poise.grpc``: gRPC's wire rules as pure functions (timeouts, trailers-only answers, the
health-check messages), against gRPC's documented examples and round trips."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poise.grpc import (
    CODES,
    SERVING,
    format_timeout,
    health_request,
    is_grpc,
    parse_health_response,
    parse_timeout,
    trailers_only,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1S", 1.0), ("250m", 0.25), ("99999999u", 99.999999), ("2H", 7200.0), ("3M", 180.0),
     ("100n", 1e-7), (" 5S ", 5.0)],
)  # fmt: skip
def test_a_grpc_timeout_is_read(value: str, seconds: float) -> None:
    got = parse_timeout(value)
    assert got is not None and got == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "S", "1", "123456789S", "1s", "-1S", "1.5S", "1 S", "1SS"])
def test_what_is_not_a_grpc_timeout_is_none(value: str) -> None:
    assert parse_timeout(value) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.05, "50000000n"), (0.25, "250000u"), (1.0, "1000000u"), (30.0, "30000000u"),
     (1000.0, "1000000m"), (200_000.0, "200000S"), (1e-9, "1n"), (0.0, "1n"), (-3.0, "1n")],
)  # fmt: skip
def test_a_timeout_is_written_in_the_finest_unit_that_fits(seconds: float, text: str) -> None:
    assert format_timeout(seconds) == text


_NS = {"n": 1, "u": 10**3, "m": 10**6, "S": 10**9, "M": 60 * 10**9, "H": 3600 * 10**9}


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False, exclude_min=True))
def test_a_written_timeout_is_the_deadline_rounded_up_to_one_unit(seconds: float) -> None:
    text = format_timeout(seconds)
    assert len(text) <= 9 and parse_timeout(text) is not None
    unit = _NS[text[-1]]
    back = Fraction(int(text[:-1]) * unit, 10**9)  # exact, in seconds
    half_ns = Fraction(1, 2 * 10**9)
    exact = Fraction(seconds)
    # never sooner than the deadline (to the nearest nanosecond), at most one unit later
    assert back >= exact - half_ns
    assert back - exact <= Fraction(unit, 10**9) + half_ns
    # and the finest unit that fits: the next finer one would need more than 8 digits
    finer = {"u": "n", "m": "u", "S": "m", "M": "S", "H": "M"}.get(text[-1])
    if finer is not None:
        assert back * 10**9 / _NS[finer] > 99_999_999 - 1


def test_grpc_content_types() -> None:
    for yes in ("application/grpc", "application/grpc+proto", "Application/GRPC; charset=x"):
        assert is_grpc(yes)
    for no in ("application/grpc-web", "application/json", "text/plain", ""):
        assert not is_grpc(no)


def test_a_trailers_only_answer() -> None:
    assert trailers_only(CODES["UNAVAILABLE"], "No healthy server available") == [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", "14"),
        ("grpc-message", "No healthy server available"),
    ]
    # percent-encoding: '%' itself and anything outside printable ASCII
    fields = dict(trailers_only(CODES["DEADLINE_EXCEEDED"], "100% late: é\n"))
    assert fields["grpc-status"] == "4"
    assert fields["grpc-message"] == "100%25 late: %C3%A9%0A"
    assert "grpc-message" not in dict(trailers_only(0))


def test_health_request_bytes_are_grpcs() -> None:
    assert health_request() == b"\x00\x00\x00\x00\x00"
    assert health_request("pkg.Svc") == bytes.fromhex("00000000090a07706b672e537663")
    long = "s" * 200  # a length that needs a two-byte varint
    assert health_request(long)[5:8] == b"\x0a\xc8\x01"


@pytest.mark.parametrize(
    ("data", "status"),
    [(b"\x00\x00\x00\x00\x02\x08\x01", SERVING), (b"\x00\x00\x00\x00\x02\x08\x02", 2),
     (b"\x00\x00\x00\x00\x00", 0),  # proto3 leaves out UNKNOWN
     (b"\x00\x00\x00\x00\x07\x12\x03abc\x08\x01", SERVING),  # an unknown field is skipped
     (b"\x00\x00\x00\x00\x0b\x19" + bytes(8) + b"\x08\x01", SERVING),  # a 64-bit one too
     ],
)  # fmt: skip
def test_a_health_response_is_read(data: bytes, status: int) -> None:
    assert parse_health_response(data) == status


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x00\x00", b"\x01\x00\x00\x00\x02\x08\x01",  # compressed
     b"\x00\x00\x00\x00\x03\x08\x01",  # length says more than there is
     b"\x00\x00\x00\x00\x01\x08",  # a varint cut short
     b"\x00\x00\x00\x00\x03\x12\x05a",  # a length-delimited field running past the end
     b"\x00\x00\x00\x00\x02\x0b\x01",  # wire type 3 (a group): not proto3
     ],
)  # fmt: skip
def test_what_is_not_a_health_response_is_none(data: bytes) -> None:
    assert parse_health_response(data) is None


@given(st.binary(max_size=64))
def test_any_bytes_give_a_status_or_none_and_never_raise(body: bytes) -> None:
    framed = b"\x00" + len(body).to_bytes(4, "big") + body
    got = parse_health_response(framed)
    assert got is None or got >= 0
