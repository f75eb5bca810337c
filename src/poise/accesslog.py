"""Access log: one line per request, JSON (default) or the combined log format.

Theory of operation
-------------------
Off by default, and then it costs one ``is None`` test per request. On, a finished exchange
becomes one formatted line appended to a list; the list is written with one ``os.write`` when
it holds ``BUFFER`` bytes, on the worker's timer tick (every 250 ms), and at shutdown. A file
is opened in append mode (logrotate's copytruncate or a rename followed by ``reopen()``
both work). ``sample`` keeps that share of the lines (0 < sample <= 1), drawn at random.

Fields (JSON): ``time`` (UTC, ISO 8601 with milliseconds), ``client``, ``method``, ``path``
(the request-target as sent), ``status`` (what the client got), ``bytes`` (response body
bytes, when framed by Content-Length), ``backend`` (``host:port`` of the last backend tried,
also when poise answered for it, a 502/504 say; ``-`` when none was tried), ``attempts``
(backends tried), ``duration_ms`` (first request byte to last response byte), ``end``
(``ok``: the backend's response was relayed; ``local``: poise answered, an error such as
502/503/504; the status says which).
"""

from __future__ import annotations

import os
import random
import time
from json.encoder import encode_basestring_ascii as _q
from typing import TYPE_CHECKING

from poise.config.model import AccessLogConfig
from poise.l7.request import field_list

if TYPE_CHECKING:
    from poise.l7.request import Exchange

BUFFER = 64 * 1024
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class AccessLog:
    __slots__ = ("_fd", "_own", "_rng", "cfg", "dropped", "lines", "pending", "size", "written")

    def __init__(self, cfg: AccessLogConfig, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self._rng = rng or random.Random()
        self.pending: list[str] = []
        self.size = 0
        self.lines = 0
        self.written = 0
        self.dropped = 0  # lines lost to write errors (a full disk, say)
        self._fd = 1
        self._own = False
        self.reopen()

    def reopen(self) -> None:
        """(Re)open the file (after a log rotation); "-" is standard output."""
        self.flush()
        if self._own:
            os.close(self._fd)
        if self.cfg.path == "-":
            self._fd, self._own = 1, False
        else:
            self._fd = os.open(self.cfg.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._own = True

    def record(self, ex: Exchange, client: bytes, seconds: float, end: str) -> None:
        if self.cfg.sample < 1.0 and self._rng.random() >= self.cfg.sample:
            return
        backend = ex.backend.authority if ex.backend is not None else "-"
        now = time.time()
        if self.cfg.format == "combined":
            line = _combined(ex, client, now)
        else:
            # formatted by hand with the C string escaper: json.dumps of a dict costs
            # several times more, per request
            body = "null" if ex.body_out is None else ex.body_out
            line = (
                f'{{"time":"{_stamp(now)}.{int(now % 1 * 1000):03d}Z",'
                f'"client":{_q((ex.client_ip or client).decode("latin-1"))},'
                f'"method":{_q(ex.method.decode("latin-1"))},'
                f'"path":{_q(ex.target.decode("latin-1"))},'
                f'"status":{ex.status},"bytes":{body},"backend":"{backend}",'
                f'"attempts":{len(ex.tried)},"duration_ms":{seconds * 1000:.3f},"end":"{end}"}}'
            )
        self.pending.append(line)
        self.lines += 1
        self.size += len(line) + 1
        if self.size >= BUFFER:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        data = ("\n".join(self.pending) + "\n").encode("utf-8", "replace")
        n = len(self.pending)
        self.pending = []
        self.size = 0
        try:
            view = memoryview(data)
            while view:
                done = os.write(self._fd, view)
                view = view[done:]
            self.written += n
        except OSError:
            self.dropped += n

    def close(self) -> None:
        self.flush()
        if self._own:
            os.close(self._fd)
            self._own = False

    def statistics(self) -> dict[str, object]:
        return {"path": self.cfg.path, "lines": self.lines, "written": self.written,
                "dropped": self.dropped}  # fmt: skip


_last: list[object] = [-1, ""]  # (second, "YYYY-MM-DDTHH:MM:SS") formatted once a second


def _stamp(now: float) -> str:
    second = int(now)
    if _last[0] != second:
        t = time.gmtime(second)
        _last[0] = second
        _last[1] = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        )
    return str(_last[1])


def _combined(ex: Exchange, client: bytes, now: float) -> str:
    t = time.gmtime(now)
    stamp = (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}:{t.tm_hour:02d}:"
        f"{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )
    request = (ex.method + b" " + ex.target).decode("latin-1").replace('"', "%22")
    fields = field_list(ex)
    referer = _field(fields, b"referer")
    agent = _field(fields, b"user-agent")
    who = (ex.client_ip or client).decode("latin-1")
    version = "HTTP/2.0" if ex.unframed else "HTTP/1.1"  # (HTTP/1.0 is forwarded as 1.1)
    return (
        f'{who} - - [{stamp}] "{request} {version}" {ex.status} '
        f'{"-" if ex.body_out is None else ex.body_out} "{referer}" "{agent}"'
    )


def _field(headers: list[bytes], lname: bytes) -> str:
    for i in range(0, len(headers) - 2, 4):
        if headers[i].lower() == lname:
            return headers[i + 2].decode("latin-1").replace('"', "%22")
    return "-"
