"""Building blocks for ``load``: the problem collector and checkers for single values.

A checker takes a raw decoded value and returns the typed value or raises ``ValueError`` with a
message; :class:`Checker` turns that message into a problem prefixed by the value's path.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from poise.balancing.keys import KeySource
from poise.config.values import describe_type, normalize_route_host, parse_duration

__all__ = [
    "Checker",
    "check_bool",
    "check_host_header",
    "check_method",
    "check_name",
    "check_str",
    "check_url_path",
    "check_weight",
    "choice",
    "int_in",
    "key_path",
    "positive_duration",
]

T = TypeVar("T")
V = TypeVar("V")

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_METHOD_RE = re.compile(r"[A-Z]+")
_MAX_WEIGHT = 1000


def key_path(path: str, key: str) -> str:
    part = key if _NAME_RE.fullmatch(key) else f"[{key!r}]"
    if not path or part.startswith("["):
        return f"{path}{part}"
    return f"{path}.{part}"


def _normalized(key: str) -> str:
    # So "healthCheck" and "health-check" still find "health_check".
    return key.lower().replace("_", "").replace("-", "")


def _unknown_key(key: str, allowed: Sequence[str]) -> str:
    by_norm = {_normalized(a): a for a in allowed}
    match = difflib.get_close_matches(_normalized(key), list(by_norm), n=1, cutoff=0.6)
    if match:
        return f"unknown key (did you mean {by_norm[match[0]]!r}?)"
    return f"unknown key (expected one of: {', '.join(allowed)})"


def check_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected a boolean (true or false), got {describe_type(value)}")
    return value


def int_in(low: int, high: int | None = None) -> Callable[[object], int]:
    def check(value: object) -> int:
        # bool is a subclass of int; true/false must not pass as 1/0.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {describe_type(value)}")
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {bounds}, got {value}")
        return value

    return check


def check_cidrs(value: object) -> tuple[str, ...]:
    """A list of addresses or networks ("10.0.0.0/8", "::1"), normalised."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of addresses or CIDR networks, e.g. ['10.0.0.0/8']")
    out = []
    for v in value:
        try:
            out.append(str(ipaddress.ip_network(v.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"not an address or CIDR network: {v!r}") from None
    return tuple(out)


def check_key_source(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"expected a key source such as 'header:X-User', got {describe_type(value)}"
        )
    source = KeySource.parse(value)
    if source.kind == "header" and b"_" in source.name:
        # the proxy drops request fields whose name holds "_" (docs/http.md): such a key
        # would never be found, and every request would take the fallback
        raise ValueError(
            f"{value!r} never matches: poise drops request header fields whose name contains "
            "'_' (as nginx does by default), so no request reaches the balancer with it; "
            "use the name with '-'"
        )
    return str(source)


def check_positive_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"expected a number above 0, got {value!r}")
    return float(value)


def check_balance_factor(value: object) -> float:
    factor = check_positive_number(value)
    if factor <= 1.0:
        raise ValueError(f"must be above 1.0 (e.g. 1.25), got {value!r}")
    return factor


def check_cookie_name(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", value):
        raise ValueError(f"not a cookie name (RFC 6265 token): {value!r}")
    return value


def check_secret(value: object) -> str:
    if not isinstance(value, str) or len(value) < 16:
        raise ValueError("expected a string of at least 16 characters")
    return value


def check_weight(value: object) -> int:
    if value == 0 and not isinstance(value, bool):
        raise ValueError("must be at least 1 (weight 0 is not supported yet)")
    return int_in(1, _MAX_WEIGHT)(value)


def check_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe_type(value)}")
    return value


def check_name(value: object) -> str:
    text = check_str(value)
    if not _NAME_RE.fullmatch(text):
        raise ValueError(f"invalid name {text!r} (use letters, digits, '_', '-', '.')")
    return text


def choice(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        text = check_str(value)
        if text.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        return text.lower()

    return check


def positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than 0, got {value!r}")
    return seconds


def check_url_path(value: object) -> str:
    text = check_str(value)
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {text!r}")
    if any(c.isspace() or c in "?#" for c in text):
        raise ValueError(f"must be a plain path (no spaces, '?' or '#'), got {text!r}")
    return text


def check_method(value: object) -> str:
    text = check_str(value)
    if not _METHOD_RE.fullmatch(text):
        hint = f" (did you mean {text.upper()!r}?)" if _METHOD_RE.fullmatch(text.upper()) else ""
        raise ValueError(f"not an upper-case HTTP method: {text!r}{hint}")
    return text


def check_host_header(value: object) -> str:
    text = check_str(value)
    if text.count(":") > 1 and not text.startswith("["):
        raise ValueError(f"IPv6 addresses must be in brackets, e.g. '[::1]', got {text!r}")
    normalize_route_host(text)
    return text


class Checker:
    """Collects problems while walking the document, so one run reports all of them."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []  # told, not refused (an expired certificate, say)

    def error(self, path: str, message: str) -> None:
        self.problems.append(f"{path or 'top level'}: {message}")

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path or 'top level'}: {message}")

    def mapping(self, value: object, path: str, allowed: Sequence[str]) -> dict[str, object] | None:
        """The object's known keys, after reporting wrong type and unknown keys."""
        if not isinstance(value, Mapping):
            self.error(path, f"expected an object, got {describe_type(value)}")
            return None
        known: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.error(path, f"key {key!r} is not a string")
            elif key not in allowed:
                self.error(key_path(path, key), _unknown_key(key, allowed))
            else:
                known[key] = item
        return known

    def items(self, value: object, path: str) -> Sequence[object]:
        """Elements of a required non-empty list (empty sequence after reporting a problem)."""
        if not isinstance(value, list | tuple):
            self.error(path, f"expected a list, got {describe_type(value)}")
            return ()
        if not value:
            self.error(path, "must not be empty")
        return value

    def check(self, value: V, path: str, checker: Callable[[V], T]) -> T | None:
        try:
            return checker(value)
        except ValueError as exc:
            self.error(path, str(exc))
            return None

    def field(
        self,
        obj: Mapping[str, object],
        key: str,
        path: str,
        checker: Callable[[object], T],
        default: T,
    ) -> T:
        """``obj[key]`` checked, or ``default`` when absent or invalid (invalid is reported)."""
        if key not in obj:
            return default
        result = self.check(obj[key], key_path(path, key), checker)
        return default if result is None else result

    def required(
        self, obj: Mapping[str, object], key: str, path: str, checker: Callable[[object], T]
    ) -> T | None:
        if key not in obj:
            self.error(key_path(path, key), "required but missing")
            return None
        return self.check(obj[key], key_path(path, key), checker)
