"""One reason text for a failure to reach a backend (``poise.netreasons``), shared by the
L7 proxy, the L4 relay and the health checks."""

from __future__ import annotations

import errno
import socket
import ssl

import pytest

from poise.netreasons import describe_error


def test_a_refused_connection() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ConnectionRefusedError) as caught:
            socket.create_connection(("127.0.0.1", port), timeout=5)
    assert describe_error(caught.value) == "connect refused"


def test_a_timeout() -> None:
    assert describe_error(TimeoutError()) == "connect timeout"


def test_a_reset() -> None:
    reset = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert describe_error(reset) == "connection reset"


def test_a_certificate_refused() -> None:
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] ...")
    exc.verify_message = "certificate has expired"
    assert describe_error(exc) == "tls: certificate has expired"
    made_in_python = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert describe_error(made_in_python) == "tls: certificate verify failed"


def test_another_tls_failure() -> None:
    exc = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    exc.reason = "WRONG_VERSION_NUMBER"
    assert describe_error(exc) == "tls: wrong version number"
    made_in_python = ssl.SSLError(1, "?")  # no reason attribute at all
    assert describe_error(made_in_python) == "tls: handshake failed"


def test_a_name_not_resolved() -> None:
    exc = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert describe_error(exc) == "dns: name or service not known"


def test_another_os_error() -> None:
    exc = OSError(errno.EHOSTUNREACH, "No route to host")
    assert describe_error(exc) == "no route to host"
    assert describe_error(OSError("Multiple exceptions: ...")) == "OSError"


def test_anything_else_is_named_by_its_class() -> None:
    assert describe_error(ValueError("x")) == "ValueError"
