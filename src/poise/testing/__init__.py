"""Test doubles shipped with poise, used by its integration tests and by `poise demo`.

* `HttpBackend` — a real HTTP/1.1 server on 127.0.0.1 that records requests.
* `ScriptedBackend`, `raw_request` — raw TCP server and client for protocol edge cases.
* `TcpEcho` — a TCP echo backend for L4 tests (PROXY headers, half-close, resets).
* `FakeClock` — a manually advanced clock for time-based logic.
"""

from poise.testing.backend import (
    Handler,
    HttpBackend,
    RecordedRequest,
    Response,
    echo_handler,
)
from poise.testing.clock import FakeClock
from poise.testing.raw import Script, ScriptedBackend, raw_request
from poise.testing.tcp import TcpEcho

__all__ = [
    "FakeClock",
    "Handler",
    "HttpBackend",
    "RecordedRequest",
    "Response",
    "Script",
    "ScriptedBackend",
    "TcpEcho",
    "echo_handler",
    "raw_request",
]
