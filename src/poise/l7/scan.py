"""The head scanners: one pass over a *plain* HTTP/1.1 head, in C when built, else here.

Real traffic is mostly plain heads: a bodiless request with a handful of fields, a response
with a Content-Length. For those the proxy needs little (the method, target, Host, the fields
to forward; the status, the rewritten head, the length), and httptools's callbacks plus the
checks poise adds on top of them cost several times what one scan of the bytes does. So the
client and upstream protocols first ask a scanner; it answers with the few objects they need,
or ``None``, which means "not plain": the general path (httptools and
``on_headers_complete``) takes the bytes and decides everything, rejections included.

The contract that makes this safe: **a scanner answers only where the general path would
accept the head and make the same of it.** Anything it is not sure of is ``None``: a chunked
request body, a Content-Length over ``limits.max_body_size``, forwarding fields to judge, a
``Connection`` token other than ``keep-alive``/``close``, HTTP/1.0, a field not written
``Name: value`` (one space, no trailing whitespace), more fields or bytes than the limits,
a status poise treats specially (1xx, 204, 304, 5xx), a response without Content-Length.
tests/l7/test_scan.py checks the contract: the C and Python scanners agree on every input
(hand-written, generated, and every byte of every position mutated), and on every input a
scanner answers for, the proxy's output equals the general path's.

``scan_request(data, max_target, max_headers, max_header_bytes, max_body, drop)``: ``data``
is a read that begins with a request head, followed by nothing, or by no more than the
Content-Length's worth of body (a pipelined request after it is left to the general path).
``drop`` holds lower-case field names removed from every request (the client-certificate
subject fields, see Context); ``max_body`` is ``limits.max_body_size`` (0: none). Answers
``(method, target, host, fields, keep_alive, content_length, end)``: ``fields`` is the
forwarded fields as they came, ``Name: value\\r\\n`` each (Host, ``Connection``,
``Content-Length``, the hop-by-hop fields and names with ``_`` left out, as the general path
leaves them out); ``content_length`` the field's digits as sent (None without one); ``end``
where the head ends (the body, if any, starts there).

``scan_response(data)``: ``data`` starts with a response head (a first read; body bytes may
follow). Answers ``(status, rewritten, length, end, keep_alive)``: ``rewritten`` is the status
line and the fields without their final CRLFs and without the hop-by-hop fields (what
``UpstreamConnection.on_headers_complete`` makes of it), ``length`` the Content-Length,
``end`` where the body starts.

The C twin is src/poise/l7/_scan.c, built by ``pip install .`` (setup.py) next to the
mypyc modules; ``NATIVE`` says which one is in use. ``POISE_PURE_PYTHON=1`` at build time
(or no C compiler) leaves this module's functions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

# what scan_request and scan_response answer (see above)
RequestScan = tuple[bytes, bytes, bytes, bytes, bool, bytes | None, int]
ResponseScan = tuple[int, bytes, int, int, bool]

CRLF: Final = b"\r\n"
RESPONSE_MAX: Final = 65536  # a longer response head is left to the general path

_METHOD: Final = rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH)"
# origin-form target: the bytes llhttp takes in a target (0x21-0x7e), less "#" and "\"
_LINE: Final = _METHOD + rb" (/[\x21\x22\x24-\x5b\x5d-\x7e]*) HTTP/1\.1\r\n"
_TCHAR: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# "Name: value": one space, a value that starts and ends with a visible byte (no DEL)
_VISIBLE: Final = rb"[\x21-\x7e\x80-\xff]"
_NAME_VALUE: Final = (
    rb"(" + _TCHAR + rb"): (" + _VISIBLE + rb"(?:[\t\x20-\x7e\x80-\xff]*" + _VISIBLE + rb")?)"
)
_PLAIN_FIELD: Final = re.compile(_NAME_VALUE + rb"\r\n")
# a whole plain request head: the line (method, target), the fields, the empty line
_PLAIN_REQUEST: Final = re.compile(_LINE + rb"((?:" + _NAME_VALUE + rb"\r\n)*)\r\n")
# the names _scan_request must look at, in "\r\n" + the lower-cased fields
_SPECIAL: Final = re.compile(
    rb"\r\n(host|connection|content-length|transfer-encoding|x-forwarded-(?:for|proto|host)"
    rb"|forwarded|keep-alive|proxy-connection|te|trailer|upgrade|proxy-authorization"
    rb"|[^:\r\n_]*_[^:\r\n]*):"
)
_TEXT: Final = rb"[\t\x20-\x7e\x80-\xff]*"  # a reason phrase, a field value with its whitespace
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.1 ([0-9]{3}) " + _TEXT + rb"\r\n")
# a response head up to its empty line: the status line, then "\r\nName:value" per field
_PLAIN_RESPONSE: Final = re.compile(
    rb"HTTP/1\.1 ([0-9]{3}) " + _TEXT + rb"(?:\r\n" + _TCHAR + rb":" + _TEXT + rb")*"
)
# the response fields _scan_response must look at, in the lower-cased fields
_RESPONSE_SPECIAL: Final = re.compile(
    rb"\r\n(content-length|connection|transfer-encoding|keep-alive|proxy-connection|trailer"
    rb"|upgrade|proxy-authenticate):"
)
_FIELD: Final = re.compile(rb"(" + _TCHAR + rb"):([\t\x20-\x7e\x80-\xff]*)\r\n")
_HOST: Final = re.compile(
    rb"(?:[A-Za-z0-9._~!$&'()*+;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?"
)  # as http.HOST_RE
_LENGTH: Final = re.compile(rb"[0-9]{1,18}")

# request fields: None = not plain (the general path decides), True = dropped
_REQUEST_SPECIAL: Final[dict[bytes, bool | None]] = {
    b"transfer-encoding": None,
    b"x-forwarded-for": None,
    b"x-forwarded-proto": None,
    b"x-forwarded-host": None,
    b"forwarded": None,
    b"keep-alive": True,
    b"proxy-connection": True,
    b"te": True,
    b"trailer": True,
    b"upgrade": True,
    b"proxy-authorization": True,
}
_RESPONSE_DROPPED: Final = frozenset(
    (b"keep-alive", b"proxy-connection", b"trailer", b"upgrade", b"proxy-authenticate")
)


def _scan_request(  # noqa: PLR0917 (positional, as its C twin's)
    data: bytes,
    max_target: int,
    max_headers: int,
    max_header_bytes: int,
    max_body: int,
    drop: tuple[bytes, ...],
) -> RequestScan | None:
    # the head is data[:n]: the whole read when it ends with an empty line (the usual read, a
    # bodiless head; an earlier empty line leaves it to the general path), else up to the
    # first empty line
    if len(data) <= max_header_bytes and data.endswith(b"\r\n\r\n"):
        n = len(data)
    else:
        n = data.find(b"\r\n\r\n", 0, max_header_bytes) + 4
    if n < 18:
        return None  # not all here, longer than max_header_bytes, or too short
    m = _PLAIN_REQUEST.fullmatch(data, 0, n)  # the syntax, at once
    if m is None or len(m.group(2)) > max_target:
        return None
    text = b"\r\n" + m.group(3)  # "\r\nName: value" per field, then "\r\n"
    if text.count(b"\r\n") - 1 > max_headers:
        return None
    low = text.lower()
    if _SPECIAL.findall(low) != [b"host"] or any(b"\r\n" + d + b":" in low for d in drop):
        return _request_fields(data, m, n, drop=drop, max_headers=max_headers, max_body=max_body)
    # the usual head: nothing special but its Host field, which is taken out
    i = low.find(b"\r\nhost: ")
    j = text.find(b"\r\n", i + 2)
    host = text[i + 8 : j]
    if not _HOST.fullmatch(host) or len(data) != n:
        return None  # (more bytes after a bodiless request: pipelined, parsed)
    return m.group(1), m.group(2), host, (text[:i] + text[j:])[2:], True, None, n


def _request_fields(
    data: bytes,
    m: re.Match[bytes],
    n: int,
    *,
    drop: tuple[bytes, ...],
    max_headers: int,
    max_body: int,
) -> RequestScan | None:
    """_scan_request for a head with more than a Host to look at: field by field."""
    pos = m.end(2) + 11  # after the request line
    host: bytes | None = None
    length: bytes | None = None
    keep = True
    fields = 0
    kept: list[bytes] = []
    while data[pos : pos + 2] != CRLF:
        f = _PLAIN_FIELD.match(data, pos)
        if f is None:
            return None
        pos = f.end()
        fields += 1
        if fields > max_headers:
            return None
        name, value = f.group(1), f.group(2)
        lname = name.lower()
        if lname == b"host":
            if host is not None or not _HOST.fullmatch(value):
                return None
            host = value
        elif lname == b"connection":
            lvalue = value.lower()
            if lvalue == b"close":
                keep = False
            elif lvalue != b"keep-alive":
                return None
        elif lname == b"content-length":
            if length is not None or not _LENGTH.fullmatch(value):
                return None
            length = value
        elif lname in _REQUEST_SPECIAL:
            if _REQUEST_SPECIAL[lname] is None:
                return None
        elif name.find(b"_") < 0 and lname not in drop:
            kept.append(f.group(0))
    if pos + 2 != n or host is None or not _body_fits(len(data) - n, length, max_body):
        return None
    return m.group(1), m.group(2), host, b"".join(kept), keep, length, n


def _body_fits(after: int, length: bytes | None, max_body: int) -> bool:
    """``after`` bytes follow the head: no more than the body (a pipelined request after it
    is parsed), which is within limits.max_body_size (else the general path answers 413)."""
    if length is None:
        return after == 0
    return not (max_body and int(length) > max_body) and after <= int(length)


def _scan_response(data: bytes) -> ResponseScan | None:
    end = data.find(b"\r\n\r\n", 0, RESPONSE_MAX)
    if end < 0:
        return None
    m = _PLAIN_RESPONSE.fullmatch(data, 0, end)  # the syntax, at once
    if m is None:
        return None
    status = int(m.group(1))
    if status < 200 or status >= 500 or status in (204, 304):
        return None
    low = data[m.end(1) : end].lower()
    found = _RESPONSE_SPECIAL.findall(low)
    if found == [b"content-length"]:
        rewritten = data[:end]
    elif found in ([b"content-length", b"connection"], [b"connection", b"content-length"]):
        # the usual head (nginx's): "Connection: keep-alive" is taken out
        i = low.find(b"\r\nconnection:")
        j = low.find(b"\r\n", i + 2)
        if j < 0:
            j = len(low)
        if low[i + 13 : j].strip(b" \t") != b"keep-alive":
            return _response_fields(data)
        at = m.end(1)  # where low starts in data
        rewritten = data[: at + i] + data[at + j : end]
    else:
        return _response_fields(data)
    i = low.find(b"\r\ncontent-length:")
    j = low.find(b"\r\n", i + 2)
    value = low[i + 17 : j if j >= 0 else len(low)].strip(b" \t")
    if not _LENGTH.fullmatch(value):
        return None
    return status, rewritten, int(value), end + 4, True


def _response_fields(data: bytes) -> ResponseScan | None:
    """_scan_response for a head with more to look at: field by field."""
    if len(data) > RESPONSE_MAX:
        data = data[:RESPONSE_MAX]
    m = _STATUS_LINE.match(data)
    if m is None:
        return None
    status = int(m.group(1))
    if status < 200 or status >= 500 or status in (204, 304):
        return None
    pos = m.end()
    kept = [data[: pos - 2]]
    length = -1
    keep = True
    while True:
        if len(data) - pos < 2:
            return None
        if data[pos] == 13:  # "\r": the empty line, or a bad one
            if data[pos + 1] != 10:
                return None
            pos += 2
            break
        f = _FIELD.match(data, pos)
        if f is None:
            return None
        lname = f.group(1).lower()
        value = f.group(2).strip(b" \t")
        line = data[pos - 2 : f.end() - 2]  # "\r\n" + the field line, as it came
        pos = f.end()
        if lname == b"content-length":
            if length >= 0 or not _LENGTH.fullmatch(value):
                return None
            length = int(value)
        elif lname == b"connection":
            lvalue = value.lower()
            if lvalue not in (b"close", b"keep-alive"):
                return None
            keep = keep and lvalue == b"keep-alive"
            continue
        elif lname == b"transfer-encoding":
            return None
        elif lname in _RESPONSE_DROPPED:
            continue
        kept.append(line)
    if length < 0:
        return None
    return status, b"".join(kept), length, pos, keep


scan_request: Callable[[bytes, int, int, int, int, tuple[bytes, ...]], RequestScan | None]
scan_response: Callable[[bytes], ResponseScan | None]
scan_request, scan_response = _scan_request, _scan_response
NATIVE = False
try:
    from poise.l7 import _scan
except ImportError:  # the pure-Python build (or no compiler at install time)
    pass
else:
    scan_request = _scan.scan_request
    scan_response = _scan.scan_response
    NATIVE = True
