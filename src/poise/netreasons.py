"""One short reason for a failure to reach a backend, the same for L7, L4 and the health
checks: what logs, passive health (ejection reasons) and the admin API's ``check.reason``
show.

    connection refused                    connect refused
    connection reset                      connection reset
    timed out (TimeoutError)              connect timeout
    certificate refused                   tls: <what the verification said>
    other TLS failure                     tls: <OpenSSL's reason, in words>
    host name not resolved                dns: <the resolver's message>
    other OSError                         <its message, lower case>
    anything else                         <its class name>

A caller that knows how long it waited says so itself ("connect timeout 1s", a probe's
"timeout 1s").
"""

from __future__ import annotations

import socket
import ssl


def describe_error(exc: BaseException) -> str:
    """A short reason for ``exc``: "connect refused", "tls: certificate has expired", ..."""
    # (an SSLError made in Python, not by OpenSSL, has no reason nor verify_message)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"tls: {getattr(exc, 'verify_message', None) or 'certificate verify failed'}"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or "handshake failed"
        return f"tls: {reason.lower().replace('_', ' ')}"
    if isinstance(exc, TimeoutError):
        return "connect timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connect refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, socket.gaierror):
        return f"dns: {(exc.strerror or 'lookup failed').lower()}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__
