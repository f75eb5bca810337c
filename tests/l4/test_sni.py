"""SniRouter: which upstream a server name (or bytes that are not a ClientHello) goes to."""

from __future__ import annotations

import ssl

import pytest

from poise.config.model import SniRouteConfig
from poise.l4.sni import SniRouter

ROUTER = SniRouter(
    "default",
    (
        SniRouteConfig(("a.example.test", "*.b.example.test"), "one"),
        SniRouteConfig(("x.b.example.test", "*.example.test"), "two"),
    ),
)


@pytest.mark.parametrize(
    ("name", "upstream"),
    [
        ("a.example.test", "one"),
        ("x.b.example.test", "two"),  # exact wins over the wildcard
        ("y.b.example.test", "one"),
        ("b.example.test", "two"),  # *.example.test, not *.b.example.test
        ("z.y.b.example.test", "default"),  # a wildcard covers one label
        ("example.test", "default"),
        ("test", "default"),
        (None, "default"),
    ],
)
def test_match(name: str | None, upstream: str) -> None:
    assert ROUTER.match(name) == upstream


def hello(name: str) -> bytes:
    obj = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=name
    )
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_peek() -> None:
    data = hello("Q.B.example.test")
    assert ROUTER.peek(data) == ("one", True)
    assert ROUTER.peek(data[:10]) is None  # more, please
    assert ROUTER.peek(data[:10], eof=True) == ("default", False)  # ... but it ended
    assert ROUTER.peek(b"SSH-2.0-x\r\n") == ("default", False)
    assert ROUTER.peek(b"") is None
    assert ROUTER.peek(b"", eof=True) == ("default", False)
