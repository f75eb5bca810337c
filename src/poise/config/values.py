"""Parsers for single configuration values: durations, listen addresses, backend URLs, hosts.

Each raises ``ValueError`` with a message that makes sense on its own; ``parse_config`` prefixes
it with the dotted path of the value. Every string is matched against a strict pattern before
any number is converted, because ``int()``/``float()`` accept " 1", "1_0", "inf" and "nan".
"""

from __future__ import annotations

import ipaddress
import math
import re
from fractions import Fraction

__all__ = [
    "describe_type",
    "normalize_route_host",
    "parse_backend_url",
    "parse_duration",
    "parse_listen",
    "parse_status_range",
]

_UNITS: dict[str, Fraction] = {
    "ns": Fraction(1, 1_000_000_000),
    "us": Fraction(1, 1_000_000),
    "\u00b5s": Fraction(1, 1_000_000),  # MICRO SIGN, what Go prints
    "\u03bcs": Fraction(1, 1_000_000),  # GREEK SMALL LETTER MU, what people type
    "ms": Fraction(1, 1_000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
# Longer units first so "ms" is not read as "m" followed by garbage.
_UNIT = "|".join(sorted((re.escape(u) for u in _UNITS), key=len, reverse=True))
_DURATION_RE = re.compile(rf"(?:{_NUMBER}(?:{_UNIT}))+")
_SEGMENT_RE = re.compile(rf"({_NUMBER})({_UNIT})")
# Shaped like a duration but with a unit we do not know: worth a more specific message.
_LOOSE_SEGMENT_RE = re.compile(rf"{_NUMBER}([A-Za-z\u00b5\u03bc]+)")
_LOOSE_DURATION_RE = re.compile(rf"(?:{_NUMBER}[A-Za-z\u00b5\u03bc]+)+")
_DURATION_EXAMPLES = "e.g. '500ms', '2s', '1m30s', '1h', or a number of seconds"

_TYPE_NAMES: dict[type, str] = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "list",
    tuple: "list",
    dict: "object",
    type(None): "null",
}


def describe_type(value: object) -> str:
    """The document-level name of ``value``'s type, for "expected X, got Y" messages."""
    for cls, name in _TYPE_NAMES.items():
        if type(value) is cls:
            return name
    return type(value).__name__


def parse_duration(value: object) -> float:
    """Seconds from a Go-style duration string ("1m30s", "250ms") or a number of seconds."""
    # bool is an int subclass: reject it before the number branch.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration ({_DURATION_EXAMPLES}), got {describe_type(value)}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"duration must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value!r}")
        return _finite_seconds(Fraction(value))
    if value == "":
        raise ValueError(f"empty duration ({_DURATION_EXAMPLES})")
    if value.startswith("-") and _DURATION_RE.fullmatch(value[1:]):
        raise ValueError(f"duration must not be negative, got {value!r}")
    if value == "0":  # Go allows a unitless zero; any other bare number is ambiguous
        return 0.0
    if _DURATION_RE.fullmatch(value):
        total = sum(
            (Fraction(num) * _UNITS[unit] for num, unit in _SEGMENT_RE.findall(value)),
            Fraction(0),
        )
        return _finite_seconds(total)
    if re.fullmatch(_NUMBER, value):
        raise ValueError(f"missing unit in duration {value!r} (e.g. '{value}s')")
    if _LOOSE_DURATION_RE.fullmatch(value):
        for unit in _LOOSE_SEGMENT_RE.findall(value):
            if unit not in _UNITS:
                raise ValueError(
                    f"unknown unit {unit!r} in duration {value!r} (units: ns, us, ms, s, m, h)"
                )
    raise ValueError(f"not a duration: {value!r} ({_DURATION_EXAMPLES})")


def _finite_seconds(seconds: Fraction) -> float:
    try:
        result = float(seconds)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise ValueError("duration is too large")
    return result


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
# Underscores are not valid in DNS hostnames but are common in container/service names.
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def _is_hostname_or_ipv4(host: str) -> bool:
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
        return False
    if re.fullmatch(r"[0-9.]+", host):
        # All-numeric names are meant as IPv4 addresses; "999.1.1.1" would only fail at bind time.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
    return True


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _parse_port(text: str, *, what: str, minimum: int) -> int:
    if not _PORT_RE.fullmatch(text):
        raise ValueError(f"invalid port {text!r} in {what}")
    port = int(text)
    if not minimum <= port <= 65535:
        raise ValueError(f"port out of range ({minimum}-65535): {port} in {what}")
    return port


def _split_host_port(text: str, *, what: str) -> tuple[str, str | None]:
    """Split "host:port", "[v6]:port", "host" or "[v6]"; IPv6 hosts come back unbracketed."""
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise ValueError(f"unclosed '[' in {what}")
        host, rest = text[1:end], text[end + 1 :]
        if not _is_ipv6(host):
            raise ValueError(f"invalid IPv6 address {host!r} in {what}")
        if rest == "":
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']' in {what}")
        return host, rest[1:]
    if text.count(":") > 1:
        raise ValueError(f"IPv6 addresses must be in brackets, e.g. '[::1]:8080', in {what}")
    host, sep, port = text.partition(":")
    if host and not _is_hostname_or_ipv4(host):
        raise ValueError(f"invalid host {host!r} in {what}")
    return host, (port if sep else None)


def parse_listen(value: object) -> tuple[str, int]:
    """``(host, port)`` to bind; host "" means all interfaces. Port 0 (ephemeral) is allowed."""
    expected = "an address like ':8080' or '127.0.0.1:8080', or a port number"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected {expected}, got {describe_type(value)}")
    if isinstance(value, int):
        if not 0 <= value <= 65535:
            raise ValueError(f"port out of range (0-65535): {value}")
        return "", value
    what = f"listen address {value!r}"
    if value == "":
        raise ValueError(f"empty listen address (expected {expected})")
    if _PORT_RE.fullmatch(value):
        return "", _parse_port(value, what=what, minimum=0)
    host, port = _split_host_port(value, what=what)
    if port is None:
        raise ValueError(f"missing port in {what} (e.g. '{value}:8080')")
    return host, _parse_port(port, what=what, minimum=0)


_URL_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)", re.DOTALL)


def parse_backend_url(value: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a backend URL: ``http://`` or ``https://host[:port][/]``."""
    if not isinstance(value, str):
        raise ValueError(f"expected a URL string, got {describe_type(value)}")
    m = _URL_RE.fullmatch(value)
    if m is None or any(c.isspace() for c in value):
        raise ValueError(f"not a URL: {value!r} (expected e.g. 'http://127.0.0.1:5001')")
    scheme = m["scheme"].lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported scheme {scheme!r} in {value!r} (only 'http', 'https')")
    rest = m["rest"]
    cut = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        raise ValueError(f"backend URL must not contain user info (user@): {value!r}")
    if "#" in tail:
        raise ValueError(f"backend URL must not have a fragment: {value!r}")
    if "?" in tail:
        raise ValueError(f"backend URL must not have a query: {value!r}")
    if tail not in ("", "/"):
        raise ValueError(f"backend URL must not have a path: {value!r}")
    what = f"URL {value!r}"
    host, port = _split_host_port(authority, what=what)
    if host == "":
        raise ValueError(f"backend URL has no host: {value!r}")
    if port is None:
        return scheme, host.lower(), 443 if scheme == "https" else 80
    return scheme, host.lower(), _parse_port(port, what=what, minimum=1)


def normalize_route_host(value: str) -> str:
    """A route's Host pattern: lower-cased, port and trailing dot removed, IPv6 unbracketed."""
    if value == "" or any(c.isspace() for c in value):
        raise ValueError(f"invalid host name {value!r}")
    what = f"host {value!r}"
    if value.startswith("["):
        host, port = _split_host_port(value, what=what)
    elif value.count(":") > 1:
        if not _is_ipv6(value):
            raise ValueError(f"invalid host name {value!r}")
        host, port = value, None
    else:
        name, sep, port_text = value.partition(":")
        host, port = name.removesuffix("."), (port_text if sep else None)
        if not _is_hostname_or_ipv4(host):
            raise ValueError(f"invalid host name {value!r}")
    if port is not None:
        _parse_port(port, what=what, minimum=1)
    return host.lower()


_STATUS_RE = re.compile(r"([0-9]{3})(?:-([0-9]{3}))?")


def parse_status_range(value: object) -> tuple[int, int]:
    """One ``expected_status`` item: 200, "200" or "200-399" -> inclusive (low, high)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(
            f"expected a status code or range like 200 or '200-399', got {describe_type(value)}"
        )
    if isinstance(value, int):
        low = high = value
    else:
        m = _STATUS_RE.fullmatch(value)
        if m is None:
            raise ValueError(f"not a status code or range: {value!r} (e.g. 200 or '200-399')")
        low = int(m[1])
        high = int(m[2]) if m[2] is not None else low
    for code in (low, high):
        if not 100 <= code <= 599:
            raise ValueError(f"status code out of range (100-599): {code}")
    if low > high:
        raise ValueError(f"empty status range {value!r}: {low} > {high}")
    return low, high
