"""Session ticket keys (poise.tls.tickets): the libssl layout assumption, rotation on a fake
clock, and resumption against a listener's real front context over 127.0.0.1 sockets.

Every test runs with each ticket key callback: the C one (src/poise/tls/_tickets.c, built
here when the install did not build it) and its pure-Python twin (ctypes)."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import hmac
import os
import socket
import ssl
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import pytest

from poise.config.model import CertificateConfig, ListenerTlsConfig
from poise.tls import tickets
from poise.tls.contexts import ListenerTls
from tests.native import SRC, compile_extension
from tests.tls.certgen import CA, Pair, serial_of
from tests.tls.helpers import client_context

# every test runs with the C record engine and with its twin (tests/tls/helpers.py)
pytestmark = pytest.mark.usefixtures("tls_engine")

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> ModuleType | None:
    """The C callback: the installed one when ``pip install .`` built it, else compiled from
    its source; None without a C compiler."""
    if tickets._native is not None:
        return cast(ModuleType, tickets._native)
    return compile_extension(SRC / "tls" / "_tickets.c", tmp_path_factory.mktemp("tk"), [])


@pytest.fixture(autouse=True, params=["C", "ctypes"])
def callback(
    request: pytest.FixtureRequest, built: ModuleType | None, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Which ticket key callback the listeners of this test get."""
    if request.param == "C":
        if built is None:
            pytest.skip("no C compiler: the ctypes callback only")
        lib = tickets.libssl()
        if lib is not None and not lib.evp:
            pytest.skip("OpenSSL 1.1.1: the ctypes callback only")
        monkeypatch.setattr(tickets, "_native", built)
        assert tickets.native_error() is None, tickets.native_error()
    else:
        monkeypatch.setattr(tickets, "_native", None)
    return str(request.param)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_ssl_ctx_pointer_layout_holds_on_this_python() -> None:
    # If this fails, CPython's _ssl changed how it stores the SSL_CTX: poise then falls back
    # to per-process ticket keys (and refuses session_ticket_keys); update tickets._Lib.
    assert tickets.libssl() is not None, tickets.lib_error()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ptr = tickets.ctx_pointer(ctx)
    assert ptr
    lib = tickets.libssl()
    assert lib is not None
    ctx.options |= ssl.OP_NO_TICKET
    assert lib.lib.SSL_CTX_get_options(ptr) == int(ctx.options)
    assert tickets.ctx_pointer(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)) != ptr


def test_the_ticket_hmac_is_keyed_right_with_its_parameters_built_once_per_key() -> None:
    """mac_init keeps the OSSL_PARAM array of each key (bounded): whether built or reused,
    the MAC libssl then computes is HMAC-SHA256 under that key."""
    lib = tickets.libssl()
    assert lib is not None, tickets.lib_error()
    if not lib.evp:
        pytest.skip("OpenSSL 1.1.1: HMAC_Init_ex, no parameter array")
    c = lib.lib
    c.EVP_MAC_fetch.restype, c.EVP_MAC_fetch.argtypes = ctypes.c_void_p, [ctypes.c_void_p] * 3
    c.EVP_MAC_CTX_new.restype, c.EVP_MAC_CTX_new.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    c.EVP_MAC_CTX_free.argtypes = [ctypes.c_void_p]
    c.EVP_MAC_free.argtypes = [ctypes.c_void_p]
    c.EVP_MAC_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    c.EVP_MAC_update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    c.EVP_MAC_final.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    mac = c.EVP_MAC_fetch(None, b"HMAC", None)
    assert mac

    def mac_with(key: bytes, data: bytes) -> bytes:
        hctx = c.EVP_MAC_CTX_new(mac)
        try:
            assert lib.mac_init(hctx, key) == 1
            assert c.EVP_MAC_init(hctx, None, 0, None) == 1
            assert c.EVP_MAC_update(hctx, data, len(data)) == 1
            out, size = ctypes.create_string_buffer(64), ctypes.c_size_t()
            assert c.EVP_MAC_final(hctx, out, ctypes.byref(size), 64) == 1
            return out.raw[: size.value]
        finally:
            c.EVP_MAC_CTX_free(hctx)

    try:
        keys = [os.urandom(32) for _ in range(40)]
        for round_ in range(2):
            for i, key in enumerate(keys):
                data = b"ticket %d %d" % (round_, i)
                # a copy: the cached array must not depend on the caller's bytes object
                assert mac_with(bytes(bytearray(key)), data) == hmac.digest(
                    key, data, hashlib.sha256
                )
                assert len(lib._params) <= 16
        first = keys[-1]
        assert mac_with(first, b"x") == mac_with(first, b"x")
    finally:
        c.EVP_MAC_free(mac)


def test_rotation_keeps_the_previous_key_for_one_period() -> None:
    clock = Clock()
    ring = tickets.TicketSecrets(3600, clock=clock)
    keys = tickets.TicketKeys(b"id", ring)
    first = keys.encrypting()
    assert first is not None and keys.find(first.name) == (first, True)
    clock.now += 3600  # the next period: a new key encrypts, the old one still decrypts
    second = keys.encrypting()
    assert second is not None and second.name != first.name
    assert keys.find(first.name) == (first, False)  # accepted, and the ticket is renewed
    clock.now += 3600
    assert keys.find(first.name) is None  # two periods on: forgotten
    assert keys.find(second.name) is not None
    assert set(ring.secrets) == {ring.epoch() - 1, ring.epoch(), ring.epoch() + 1}


@pytest.mark.parametrize("generate", [True, False])
def test_keys_kept_between_ticket_calls_are_the_ones_worked_out_afresh(generate: bool) -> None:
    """TicketKeys skips its refresh while the clock stays in the period it saw and the
    secrets do not change: at every step it must give what a new TicketKeys (which works
    everything out from the secrets) gives."""
    clock = Clock()
    supervisor = tickets.TicketSecrets(60, clock=clock)
    ring = supervisor if generate else tickets.TicketSecrets(60, generate=False, clock=clock)
    if not generate:
        ring.install(supervisor.export())
    keys = tickets.TicketKeys(b"id", ring)
    for step in [0, 1, 58, 0.5, 0.5, -1, 30, 30, -60, -0.25, 120, 7, 59.9, 0.2]:
        clock.now += step
        if step == 7:
            ring.install(supervisor.export()) if not generate else ring.advance()
        fresh = tickets.TicketKeys(b"id", ring)
        current = fresh.encrypting()
        assert keys.encrypting() == current, step
        if current is not None:
            assert keys.find(current.name) == fresh.find(current.name)
        for e in range(ring.epoch() - 3, ring.epoch() + 3):
            if e in supervisor.secrets:
                name = tickets.derive(supervisor.secrets[e], b"id").name
                assert keys.find(name) == fresh.find(name), (step, e)


def test_workers_with_the_supervisors_secrets_make_the_same_keys() -> None:
    clock = Clock()
    supervisor = tickets.TicketSecrets(60, clock=clock)
    worker = tickets.TicketSecrets(60, generate=False, clock=clock)
    worker.install(supervisor.export())
    mine, theirs = tickets.TicketKeys(b"id", supervisor), tickets.TicketKeys(b"id", worker)
    assert mine.encrypting() == theirs.encrypting()
    # the next period starts before the supervisor's next message: the worker already has
    # that period's key (sent ahead), so what it issues every other process accepts
    clock.now += 60
    issued = theirs.encrypting()
    assert issued == mine.encrypting() and issued is not None
    assert mine.find(issued.name) == (issued, True)
    # a different identity (client-certificate settings) never shares a key
    other = tickets.TicketKeys(b"other", supervisor)
    assert other.find(issued.name) is None


def test_key_files_first_encrypts_all_decrypt(tmp_path: Path) -> None:
    a, b = tmp_path / "a.key", tmp_path / "b.key"
    a.write_bytes(bytes(range(80)))
    b.write_bytes(bytes(range(80, 160)))
    keys = tickets.TicketKeys(b"id", None, tickets.read_key_files([str(a), str(b)]))
    old = tickets.TicketKeys(b"id", None, tickets.read_key_files([str(b)]))
    current = keys.encrypting()
    assert current is not None and keys.find(current.name) == (current, True)
    previous = old.encrypting()
    assert previous is not None and keys.find(previous.name) == (previous, False)
    b.write_bytes(b"short")
    with pytest.raises(ValueError, match=r"5 bytes; a ticket key file holds 80 random bytes"):
        tickets.read_key_files([str(b)])


# -- real handshakes against a listener's front context ------------------------------------


def listener_cfg(pair: Pair, **extra: Any) -> ListenerTlsConfig:
    return ListenerTlsConfig(
        certificates=(CertificateConfig(str(pair.cert), str(pair.key)),), **extra
    )


_CLIENTS: dict[tuple[ssl.TLSVersion, Pair | None], ssl.SSLContext] = {}


def handshake(
    listener: ListenerTls,
    version: ssl.TLSVersion,
    session: ssl.SSLSession | None = None,
    *,
    name: str = "a.test",
    cert: Pair | None = None,
    context_for: str | None = None,
) -> tuple[ssl.SSLSession | None, bool, bool, int]:
    """A TLS connection over 127.0.0.1 to a blocking server on ``listener.context``.
    Returns (session with its ticket, client saw resumed, server saw resumed, cert serial).
    One client context per version and certificate (Python resumes a session only with
    the context that made it)."""
    srv = socket.create_server(("127.0.0.1", 0))
    out: dict[str, Any] = {}

    def serve() -> None:
        conn, _ = srv.accept()
        try:
            with listener.context.wrap_socket(conn, server_side=True) as tls:
                out["reused"] = tls.session_reused
                out["context"] = tls.context  # switched by the SNI callback
                tls.sendall(b"x")
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            out["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    ctx = _CLIENTS.get((version, cert))
    if ctx is None:
        ctx = _CLIENTS[(version, cert)] = client_context(None, cert)
        ctx.maximum_version = version
    try:
        with (
            socket.create_connection(srv.getsockname(), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=name, session=session) as tls,
        ):
            assert tls.recv(1) == b"x"  # read: a TLS 1.3 ticket arrives before it
            tls.sendall(b"y")
            der = tls.getpeercert(binary_form=True)
            result = (tls.session, tls.session_reused, der)
    finally:
        thread.join(5)
        srv.close()
    assert "error" not in out, out
    assert der is not None
    chosen = listener.certs.select(context_for or name)
    # (the default certificate's connections stay on the front context, which has it)
    assert out["context"] is (listener.context if chosen is listener.front_default else chosen)
    return result[0], result[1], out["reused"], serial_of(der)


@pytest.mark.parametrize("version", VERSIONS, ids=["1.2", "1.3"])
def test_a_listener_resumes_until_its_key_is_two_periods_old(
    tmp_path: Path, version: ssl.TLSVersion, callback: str
) -> None:
    clock = Clock()
    ca = CA(tmp_path)
    listener = ListenerTls(
        "web", listener_cfg(ca.issue("a", ["a.test"])),
        secrets=tickets.TicketSecrets(3600, clock=clock),
    )  # fmt: skip
    assert listener.ticket_mode == "shared"
    assert listener.ticket_callback == callback
    session, reused, _, _ = handshake(listener, version)
    assert not reused
    _, reused, server_reused, _ = handshake(listener, version, session)
    assert reused and server_reused
    clock.now += 3600  # one period on: the ticket's key is the previous one, still accepted
    _, reused, _, _ = handshake(listener, version, session)
    assert reused
    clock.now += 3600  # two periods on: no longer
    _, reused, server_reused, _ = handshake(listener, version, session)
    assert not reused and not server_reused
    assert listener.tickets is not None and listener.tickets.unknown >= 1


@pytest.mark.parametrize("version", VERSIONS, ids=["1.2", "1.3"])
def test_a_client_that_always_offers_its_last_session_resumes_every_time(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """As wrk and HTTP clients with connection churn do: each connection offers the session
    of the one before. A resumed connection gets a new ticket (TLS 1.3 tickets are meant for
    one use, RFC 8446 §C.4), so the next one resumes too."""
    ca = CA(tmp_path)
    listener = ListenerTls(
        "web", listener_cfg(ca.issue("a", ["a.test"])), secrets=tickets.TicketSecrets(3600)
    )
    assert listener.tickets is not None
    session, reused, _, _ = handshake(listener, version)
    assert not reused
    seen = []
    for _ in range(4):
        issued = listener.tickets.issued
        session, reused, server_reused, _ = handshake(listener, version, session)
        # a fresh ticket with every resumption: an OpenSSL client (wrk, curl) does not offer
        # a TLS 1.3 ticket twice, so without it every other connection was a full handshake
        seen.append((reused, server_reused, listener.tickets.issued > issued))
    assert seen == [(True, True, True)] * 4


@pytest.mark.parametrize("version", VERSIONS, ids=["1.2", "1.3"])
def test_no_resumption_across_client_certificate_settings_even_with_one_key_file(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    ca = CA(tmp_path)
    pair, alice = ca.issue("a", ["a.test"]), ca.issue("alice", cn="alice", client=True)
    key = tmp_path / "ticket.key"
    key.write_bytes(bytes(range(80)))
    files = (str(key),)
    plain = ListenerTls("plain", listener_cfg(pair, session_ticket_keys=files))
    twin = ListenerTls("twin", listener_cfg(pair, session_ticket_keys=files))  # another host
    mtls = ListenerTls(
        "mtls",
        listener_cfg(
            pair, session_ticket_keys=files, client_ca=str(ca.path), client_auth="optional"
        ),
    )
    assert plain.ticket_mode == "files"
    # one client (it has a certificate, for the listener that asks)
    session, _, _, _ = handshake(plain, version, cert=alice)
    _, reused, _, _ = handshake(twin, version, session, cert=alice)
    assert reused  # same key file and settings: one host's ticket resumes on the other
    _, reused, server_reused, _ = handshake(mtls, version, session, cert=alice)
    assert not reused and not server_reused
    # and the other way: a session with a verified certificate stays on its listener
    session, _, _, _ = handshake(mtls, version, cert=alice)
    assert handshake(mtls, version, session, cert=alice)[1]
    assert not handshake(plain, version, session, cert=alice)[1]


@pytest.mark.parametrize("version", VERSIONS, ids=["1.2", "1.3"])
def test_a_resumed_handshake_still_runs_the_sni_callback(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    # (``handshake`` asserts that the server side ends in the context chosen for the name)
    ca = CA(tmp_path)
    a, b = ca.issue("a", ["a.test"]), ca.issue("b", ["b.test"])
    cfg = ListenerTlsConfig(
        certificates=(CertificateConfig(str(a.cert), str(a.key)),
                      CertificateConfig(str(b.cert), str(b.key))),
    )  # fmt: skip
    listener = ListenerTls("web", cfg)
    names: list[str | None] = []
    sni = listener.context.sni_callback
    assert sni is not None

    def counting(ssl_object: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        names.append(name)
        sni(ssl_object, name, ctx)

    listener.context.sni_callback = counting
    session, _, _, serial = handshake(listener, version, name="b.test")
    assert serial == b.serial
    _, reused, _, serial = handshake(listener, version, session, name="b.test")
    assert reused and serial == b.serial
    assert names == ["b.test", "b.test"]
    # OpenSSL resumes a session offered under another name of the same listener (all its
    # certificates share every setting; RFC 8446 4.6.1 leaves the choice to the client).
    # TLS 1.3: the connection gets the context of the name it asks for; TLS 1.2: the
    # callback is given the session's name (SSL_get_servername), so the session's context
    tls12 = version == ssl.TLSVersion.TLSv1_2
    _, reused, _, _ = handshake(
        listener, version, session, name="a.test", context_for="b.test" if tls12 else None
    )
    assert reused and len(names) == 3


def test_without_libssl_access_tickets_fall_back_to_per_process_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tickets, "_lib", None)
    monkeypatch.setattr(tickets, "_lib_error", "simulated: no SSL_CTX pointer")
    ca = CA(tmp_path)
    listener = ListenerTls("web", listener_cfg(ca.issue("a", ["a.test"])))
    assert listener.ticket_mode == "process" and listener.tickets is None
    for version in VERSIONS:
        session, _, _, _ = handshake(listener, version)
        assert handshake(listener, version, session)[1]  # OpenSSL's own keys, this process
    key = tmp_path / "ticket.key"
    key.write_bytes(bytes(80))
    with pytest.raises(ValueError, match=r"session_ticket_keys: .*\(simulated"):
        ListenerTls("files", listener_cfg(ca.issue("b"), session_ticket_keys=(str(key),)))


@pytest.mark.parametrize("version", VERSIONS, ids=["1.2", "1.3"])
def test_session_resumption_off(tmp_path: Path, version: ssl.TLSVersion) -> None:
    ca = CA(tmp_path)
    listener = ListenerTls("web", listener_cfg(ca.issue("a", ["a.test"]), session_resumption=False))
    assert listener.ticket_mode == "off"
    session, _, _, _ = handshake(listener, version)
    _, reused, server_reused, _ = handshake(listener, version, session)
    assert not reused and not server_reused


@pytest.mark.parametrize("version", VERSIONS, ids=["1.2", "1.3"])
def test_a_failing_key_lookup_is_logged_and_costs_only_the_resumption(
    tmp_path: Path, version: ssl.TLSVersion, caplog: pytest.LogCaptureFixture
) -> None:
    ca = CA(tmp_path)
    listener = ListenerTls("web", listener_cfg(ca.issue("a", ["a.test"])))
    assert listener.tickets is not None
    session, _, _, _ = handshake(listener, version)

    def broken(name: bytes) -> Any:
        raise RuntimeError("no keys today")

    listener.tickets.find = broken  # type: ignore[method-assign]
    with caplog.at_level("ERROR", logger="poise.tls"):
        result = handshake(listener, version, session)
    assert not result[1] and not result[2]
    assert "TLS ticket key callback failed" in caplog.text
    assert "no keys today" in caplog.text


@pytest.mark.parametrize("callback", ["C"], indirect=True)
def test_a_listeners_c_callback_slot_is_freed_with_its_context(
    tmp_path: Path, callback: str, built: ModuleType | None
) -> None:
    """The C callback tells listeners apart by slot; a slot is given back only when OpenSSL
    frees the context (no connection can call it any more), and then it is reused."""
    assert callback == "C" and built is not None
    gc.collect()
    before = built.in_use()
    ca = CA(tmp_path)
    pair = ca.issue("a", ["a.test"])
    listener = ListenerTls("web", listener_cfg(pair))
    assert listener.ticket_callback == "C" and built.in_use() == before + 1
    session, _, _, _ = handshake(listener, ssl.TLSVersion.TLSv1_3)
    assert handshake(listener, ssl.TLSVersion.TLSv1_3, session)[1]
    del listener
    gc.collect()
    assert built.in_use() == before
    again = ListenerTls("web", listener_cfg(pair))  # another listener: its own keys
    assert again.ticket_callback == "C" and built.in_use() == before + 1
    assert not handshake(again, ssl.TLSVersion.TLSv1_3, session)[1]
