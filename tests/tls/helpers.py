"""Helpers for the TLS tests: a keep-alive HTTPS client over asyncio streams, and the
``tls_engine`` fixture that runs a test with the C record engine (tls/_engine.c) and with
its pure-Python twin (engine.PyEngine)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass
from typing import Any

import pytest

from poise.tls import engine as engines
from tests.native import SRC, c_or_twin
from tests.tls.certgen import CA, Pair, serial_of

ENGINE_INSTALLED = engines._native  # the C engine of a compiled install (None in development)


def engine_module(request: pytest.FixtureRequest) -> Any:
    """The C engine for a test (see ``tests/native.py``); skips without a C compiler."""
    return c_or_twin(request, SRC / "tls" / "_engine.c", ENGINE_INSTALLED)


@pytest.fixture(params=["C", "python"])
def tls_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which record engine the HTTPS listeners of this test use."""
    if request.param == "C":
        monkeypatch.setattr(engines, "_native", engine_module(request))
        monkeypatch.setattr(engines, "_checked", False)
        monkeypatch.setattr(engines, "_native_error", None)
        assert engines.native_error() is None, engines.native_error()
    else:
        monkeypatch.setattr(engines, "use_native", False)
    return str(request.param)


def client_context(ca: CA | None = None, cert: Pair | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.path) if ca is not None else None)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


def server_context(pair: Pair, client_ca: CA | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pair.cert, pair.key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca.path))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names (last wins)
    body: bytes

    def request_headers(self) -> dict[str, str]:
        """What an echo backend received (its X-Request-Headers), names lower-cased."""
        return {k.lower(): v for k, v in json.loads(self.headers["x-request-headers"])}


class TlsClient:
    """One TLS connection to poise, for keep-alive requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, url: str, ctx: ssl.SSLContext, server_name: str | None = None
    ) -> TlsClient:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=server_name or host),
            5,
        )
        return cls(reader, writer)

    @property
    def serial(self) -> int:
        """Serial number of the certificate the server presented."""
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return serial_of(der)

    @property
    def alpn(self) -> str | None:
        return self.writer.get_extra_info("ssl_object").selected_alpn_protocol()  # type: ignore[no-any-return]

    async def request(self, path: str = "/", host: str = "example.test", extra: str = "") -> Reply:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        async with asyncio.timeout(5):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return Reply(status, headers, body)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


async def get(
    url: str,
    ctx: ssl.SSLContext,
    server_name: str | None = None,
    path: str = "/",
    extra: str = "",
) -> tuple[Reply, int]:
    """One request on a fresh connection: (reply, served certificate's serial)."""
    client = await TlsClient.connect(url, ctx, server_name)
    try:
        return await client.request(
            path, host=server_name or "example.test", extra=extra
        ), client.serial
    finally:
        await client.close()


def visit(
    url: str,
    ctx: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    server_name: str | None = None,
) -> tuple[ssl.SSLSession | None, bool, bytes]:
    """One request with ``Connection: close`` over a blocking socket, offering ``session``
    for resumption (run it in a thread: ``asyncio.to_thread``). Returns the session to offer
    next time (with the ticket the server sent), whether this one resumed, and the reply."""
    import socket

    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        tls = ctx.wrap_socket(raw, server_hostname=server_name or host, session=session)
        with tls:
            tls.sendall(
                f"GET / HTTP/1.1\r\nHost: {server_name or 'example.test'}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            reply = b""
            while chunk := tls.recv(65536):  # the tickets (TLS 1.3) come before the reply
                reply += chunk
            return tls.session, tls.session_reused, reply
