"""TLS session resumption on HTTPS listeners: session ticket keys shared by every worker,
rotated on a schedule, or read from files shared by several hosts.

Theory of operation
-------------------
A client that comes back resumes its session (an abbreviated handshake: no certificate, no
signature, no key exchange in TLS 1.2) if the server accepts the ticket it got last time.
OpenSSL encrypts tickets (TLS 1.2 session tickets, TLS 1.3 NewSessionTicket) with keys kept
in the ``SSL_CTX`` a connection *started* from: the listener's front context, also after the
SNI callback switched the connection to a certificate's context (OpenSSL's
``session_ctx``). By default those keys are random per ``SSL_CTX``, so per process: with
``--workers N`` a client resumes only when the kernel hands its connection to the worker
that issued its ticket, and a restarted worker forgets every ticket.

Python's ``ssl`` module offers no ticket keys, so poise reaches the listener's ``SSL_CTX``
in libssl (the library ``_ssl`` itself is linked with) through ``ctypes``:

* ``ctx_pointer``: the ``SSL_CTX *`` is the first field after the object header of CPython's
  ``_ssl._SSLContext`` (``PySSLContext.ctx``). That layout is an assumption, checked on a
  probe context before use: the options read through the pointer (``SSL_CTX_get_options``)
  must equal ``SSLContext.options`` for two different option sets. If the check fails, or
  libssl lacks a function, poise keeps OpenSSL's own per-process keys (resumption within a
  worker) and says so in a warning and in the listener's statistics (``tickets: "process"``).
* ``install``: a ticket key callback (``SSL_CTX_set_tlsext_ticket_key_evp_cb``) on the front
  context: the C one of ``_tickets.c`` when it was built (a compiled install, OpenSSL 3),
  else its twin here, a ctypes callback. Both ask ``TicketKeys`` for the key on every call.
  For a new ticket it gives the current key's name, a random IV, AES-256-CBC with the
  key's AES half and HMAC-SHA256 with its HMAC half (the format OpenSSL's own keys use); for
  a ticket presented by a client it finds the key by name, or answers "unknown" (a full
  handshake follows). Every accepted ticket is renewed: the resumed connection gets a
  fresh ticket under the current key, since a TLS 1.3 ticket is for one use and OpenSSL
  clients never offer one twice.

Where the keys come from (``TicketSecrets``): time is cut into periods of
``session_ticket_rotation`` (aligned on Unix time, so every process agrees on the period
now). The process that generates (the only process, or the ``--workers`` supervisor) keeps
a random secret for the previous, the current and the next period; workers get the
supervisor's set at start and after each period boundary, so a new worker (a restart) knows
the keys of the tickets its predecessor issued, and the next period's key is known to every
worker before anyone uses it. New tickets use the current period's key, the previous and next
periods' keys are accepted: a ticket stays good for at least one more period after its own.
Secrets older than that are forgotten. With ``session_ticket_keys``, the files are the
secrets (the first one encrypts, all decrypt), the same on every host that reads them.

A listener's keys are derived from a secret and the listener's client-certificate settings
(``identity``: the client CA bundle's contents and ``client_auth``), so a ticket issued
by a listener that did not ask for a certificate never resumes on one that requires one,
even with the same key files.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

try:
    from poise.tls import _tickets as _native_module
except ImportError:  # the pure-Python build (or no compiler at install time)
    _native: Any = None
else:
    _native = _native_module

__all__ = [
    "KEY_FILE_SIZE",
    "TicketKey",
    "TicketKeys",
    "TicketSecrets",
    "ctx_pointer",
    "derive",
    "disable_session_cache",
    "identity",
    "install",
    "lib_error",
    "libssl",
    "read_key_files",
    "set_session_id_context",
]

log = logging.getLogger("poise.tls")

KEY_FILE_SIZE = 80  # as nginx's ssl_session_ticket_key: ``openssl rand 80 > FILE``
_NAME, _HMAC, _AES = 16, 32, 32
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_SESS_CACHE_OFF = 0
_SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB = 72  # the pre-3.0 callback, for OpenSSL 1.1.1
_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_UNMODIFIED = ctypes.c_size_t(-1).value
_DIGEST = b"SHA256"  # the ticket HMAC's digest (a constant: the OSSL_PARAM points into it)


# -- keys --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TicketKey:
    name: bytes  # 16 bytes, sent in the clear in every ticket: which key to decrypt with
    hmac: bytes  # 32
    aes: bytes  # 32


def derive(secret: bytes, ident: bytes) -> TicketKey:
    """The ticket key of a listener with ``ident`` (``identity``) for ``secret``."""
    okm = hmac.new(secret, b"poise ticket key\x00" + ident, hashlib.sha512).digest()
    name = hmac.new(secret, b"poise ticket name\x00" + ident, hashlib.sha256).digest()[:_NAME]
    return TicketKey(name, okm[:_HMAC], okm[_HMAC : _HMAC + _AES])


def identity(client_ca: bytes | None, client_auth: str) -> bytes:
    """What a listener's tickets are bound to: its client-certificate settings."""
    if client_ca is None:
        return b"no client certificate"
    return hashlib.sha256(b"client_auth=" + client_auth.encode() + b"\x00" + client_ca).digest()


def read_key_files(paths: Sequence[str]) -> tuple[bytes, ...]:
    """The secrets of ``session_ticket_keys``; ValueError saying which file is wrong."""
    out = []
    for p in paths:
        try:
            data = open(p, "rb").read()  # noqa: SIM115 - small file, read whole
        except OSError as exc:
            raise ValueError(f"{p}: cannot read: {exc.strerror}") from None
        if len(data) != KEY_FILE_SIZE:
            raise ValueError(
                f"{p}: {len(data)} bytes; a ticket key file holds {KEY_FILE_SIZE} random bytes "
                f"(openssl rand {KEY_FILE_SIZE} > {p})"
            )
        out.append(data)
    return tuple(out)


class TicketSecrets:
    """A listener's rotating secrets, by period number (see the module docstring).

    ``generate``: this process makes them (single process, supervisor); else they arrive
    from the supervisor (``install``)."""

    def __init__(
        self, period: float, *, generate: bool = True, clock: Callable[[], float] = time.time
    ) -> None:
        self.period = period
        self.generate = generate
        self.clock = clock
        self.secrets: dict[int, bytes] = {}
        self.version = 0  # changes whenever ``secrets`` does

    def epoch(self) -> int:
        return int(self.clock() // self.period)

    def advance(self) -> int:
        """Bring the set to the period now: make the current and next secrets (when
        generating), forget those older than the previous period. Returns the period."""
        now = self.epoch()
        changed = False
        if self.generate:
            for e in (now, now + 1):
                if e not in self.secrets:
                    self.secrets[e] = os.urandom(32)
                    changed = True
        for e in [e for e in self.secrets if e < now - 1]:
            del self.secrets[e]
            changed = True
        if changed:
            self.version += 1
        return now

    def install(self, secrets: Mapping[int, bytes]) -> None:
        """The supervisor's set (a worker)."""
        self.secrets = dict(secrets)
        self.version += 1
        self.advance()

    def export(self) -> dict[int, bytes]:
        self.advance()
        return dict(self.secrets)

    def next_change(self) -> float:
        """Seconds until the next period starts."""
        return (self.epoch() + 1) * self.period - self.clock()


class TicketKeys:
    """One listener's keys now: the one that encrypts new tickets, and all that decrypt."""

    def __init__(
        self,
        ident: bytes,
        secrets: TicketSecrets | None = None,
        files: tuple[bytes, ...] = (),
    ) -> None:
        self.ident = ident
        self.secrets = secrets
        self.files = files  # from session_ticket_keys: fixed secrets, the first encrypts
        self._seen: tuple[int, int] | None = None
        # the period seen, on the secrets' clock: while the clock is in it and the secrets
        # have not changed (their version), _refresh has nothing to do
        self._since = self._until = 0.0
        self._current: TicketKey | None = None
        self._by_name: dict[bytes, TicketKey] = {}
        self.issued = 0  # tickets encrypted
        self.accepted = 0  # tickets decrypted (a resumption, unless OpenSSL finds it expired)
        self.unknown = 0  # tickets under a key not (or no longer) accepted

    def set_files(self, files: tuple[bytes, ...]) -> None:
        self.files = files
        self._seen = None
        self._since = self._until = 0.0

    def _refresh(self) -> None:
        s = self.secrets
        if s is None:
            if self._seen is None:
                derived = [derive(f, self.ident) for f in self.files]
                self._current = derived[0] if derived else None
                self._by_name = {k.name: k for k in derived}
                self._seen = (0, 0)
            return
        seen_before = self._seen
        if (
            seen_before is not None
            and s.version == seen_before[1]
            and self._since <= s.clock() < self._until
        ):
            return  # the same period and secrets (every ticket but the first of a period)
        now = s.advance()
        seen = (now, s.version)
        self._since, self._until = now * s.period, (now + 1) * s.period
        if seen == self._seen:
            return
        usable = {e: v for e, v in s.secrets.items() if now - 1 <= e <= now + 1}
        if not usable:
            self._current, self._by_name = None, {}
        else:
            # the current period's; a worker that has not heard of it yet: the newest it has
            e = now if now in usable else max(usable)
            keys = {x: derive(v, self.ident) for x, v in usable.items()}
            self._current = keys[e]
            self._by_name = {k.name: k for k in keys.values()}
        self._seen = seen

    def encrypting(self) -> TicketKey | None:
        self._refresh()
        return self._current

    def find(self, name: bytes) -> tuple[TicketKey, bool] | None:
        """The key named ``name`` and whether it is the current one, or None."""
        self._refresh()
        key = self._by_name.get(name)
        if key is None:
            return None
        return key, key is self._current


# -- libssl --------------------------------------------------------------------------------


class _Param(ctypes.Structure):
    _fields_ = [
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    ]


_P = ctypes.c_void_p
_EVP_CB = ctypes.CFUNCTYPE(ctypes.c_int, _P, _P, _P, _P, _P, ctypes.c_int)


class _Lib:
    """The few libssl/libcrypto functions poise calls, from the library ``_ssl`` uses."""

    def __init__(self) -> None:
        import _ssl

        lib = ctypes.CDLL(getattr(_ssl, "__file__", None))  # its dependencies' symbols too
        self.lib = lib
        f = lib.SSL_CTX_get_options
        f.restype, f.argtypes = ctypes.c_uint64, [_P]
        f = lib.SSL_CTX_ctrl
        f.restype, f.argtypes = ctypes.c_long, [_P, ctypes.c_int, ctypes.c_long, _P]
        f = lib.SSL_CTX_set_session_id_context
        f.restype, f.argtypes = ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_uint]
        f = lib.EVP_aes_256_cbc
        f.restype, f.argtypes = _P, []
        for name in ("EVP_EncryptInit_ex", "EVP_DecryptInit_ex"):
            f = getattr(lib, name)
            f.restype, f.argtypes = ctypes.c_int, [_P, _P, _P, ctypes.c_char_p, ctypes.c_char_p]
        self.evp = hasattr(lib, "SSL_CTX_set_tlsext_ticket_key_evp_cb")  # OpenSSL 3
        if self.evp:
            f = lib.SSL_CTX_set_tlsext_ticket_key_evp_cb
            f.restype, f.argtypes = ctypes.c_int, [_P, _EVP_CB]
            f = lib.EVP_MAC_CTX_set_params
            f.restype, f.argtypes = ctypes.c_int, [_P, ctypes.POINTER(_Param)]
        else:  # 1.1.1: HMAC_CTX and the callback set through SSL_CTX_callback_ctrl
            f = lib.SSL_CTX_callback_ctrl
            f.restype, f.argtypes = ctypes.c_long, [_P, ctypes.c_int, _EVP_CB]
            f = lib.HMAC_Init_ex
            f.restype, f.argtypes = ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_int, _P, _P]
            f = lib.EVP_sha256
            f.restype, f.argtypes = _P, []
        self.cipher = lib.EVP_aes_256_cbc()
        if self.evp:  # fetched once: the legacy pointer makes every init look the cipher up
            f = lib.EVP_CIPHER_fetch
            f.restype, f.argtypes = _P, [_P, ctypes.c_char_p, ctypes.c_char_p]
            self.cipher = f(None, b"AES-256-CBC", None) or self.cipher
        self._params: dict[bytes, ctypes.Array[_Param]] = {}  # by HMAC key, see mac_init
        self.offset = object.__basicsize__  # PySSLContext: PyObject_HEAD, then SSL_CTX *ctx
        self._check()

    def _pointer(self, ctx: ssl.SSLContext) -> int:
        return ctypes.c_void_p.from_address(id(ctx) + self.offset).value or 0

    def _check(self) -> None:
        base = ssl.SSLContext.__mro__[1]
        if base.__module__ != "_ssl" or base.__basicsize__ < self.offset + ctypes.sizeof(_P):
            raise RuntimeError(f"unexpected {base!r} layout")
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ptr = self._pointer(probe)
        if not ptr:
            raise RuntimeError("no SSL_CTX pointer in an SSLContext")
        for flip in (0, ssl.OP_NO_TICKET | ssl.OP_CIPHER_SERVER_PREFERENCE):
            probe.options ^= flip
            if self.lib.SSL_CTX_get_options(ptr) != int(probe.options):
                raise RuntimeError("SSL_CTX_get_options disagrees with SSLContext.options")

    def pointer(self, ctx: ssl.SSLContext) -> int:
        ptr = self._pointer(ctx)
        if not ptr or self.lib.SSL_CTX_get_options(ptr) != int(ctx.options):
            raise RuntimeError("no SSL_CTX pointer in this SSLContext")
        return ptr

    def mac_init(self, hctx: int, key: bytes) -> int:
        if self.evp:
            # the OSSL_PARAM array for a key is built once (it points into ``key``, which
            # the dict keeps alive): building it is most of this call's cost, and it runs on
            # every ticket issued or accepted
            params = self._params.get(key)
            if params is None:
                if len(self._params) >= 16:  # keys rotate: forget the old ones' arrays
                    self._params.clear()
                digest = _DIGEST
                params = (_Param * 3)(
                    _Param(b"key", _OSSL_PARAM_OCTET_STRING,
                           ctypes.cast(ctypes.c_char_p(key), _P), len(key), _UNMODIFIED),
                    _Param(b"digest", _OSSL_PARAM_UTF8_STRING,
                           ctypes.cast(ctypes.c_char_p(digest), _P), len(digest), _UNMODIFIED),
                    _Param(None, 0, None, 0, 0),
                )  # fmt: skip
                self._params[key] = params
            return int(self.lib.EVP_MAC_CTX_set_params(hctx, params))
        return int(self.lib.HMAC_Init_ex(hctx, key, len(key), self.lib.EVP_sha256(), None))


_lib: _Lib | None = None
_lib_error: str | None = None


def libssl() -> _Lib | None:
    """libssl through ctypes, checked (see the module docstring); None when it cannot be
    had (``lib_error`` says why)."""
    global _lib, _lib_error
    if _lib is None and _lib_error is None:
        try:
            _lib = _Lib()
        except (OSError, AttributeError, RuntimeError, ImportError) as exc:
            _lib_error = str(exc) or type(exc).__name__
    return _lib


def lib_error() -> str | None:
    libssl()
    return _lib_error


def ctx_pointer(ctx: ssl.SSLContext) -> int | None:
    lib = libssl()
    if lib is None:
        return None
    try:
        return lib.pointer(ctx)
    except RuntimeError:
        return None


def set_session_id_context(ctx: ssl.SSLContext, sid: bytes) -> bool:
    """Bind sessions cached by ``ctx`` to ``sid`` (at most 32 bytes)."""
    lib, ptr = libssl(), ctx_pointer(ctx)
    if lib is None or ptr is None:
        return False
    return bool(lib.lib.SSL_CTX_set_session_id_context(ptr, sid[:32], len(sid[:32])))


def disable_session_cache(ctx: ssl.SSLContext) -> bool:
    """No server-side session cache (TLS 1.2 session ids) in ``ctx``."""
    lib, ptr = libssl(), ctx_pointer(ctx)
    if lib is None or ptr is None:
        return False
    lib.lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
    return True


def _report(exc: BaseException | None) -> None:
    log.error("TLS ticket key callback failed", exc_info=exc)


def native_error() -> str | None:
    """None when new listeners get the C ticket callback (``_tickets.c``), else why not."""
    if _native is None:
        return "not built"
    lib = libssl()
    if lib is None:
        return _lib_error
    if not lib.evp:
        return "OpenSSL 1.1.1: the ctypes callback"
    import _ssl

    answer = _native.setup(getattr(_ssl, "__file__", None), _report)
    return None if answer is True else str(answer)


def install(ctx: ssl.SSLContext, keys: TicketKeys) -> object | None:
    """Make ``keys`` encrypt and decrypt the tickets of connections started from ``ctx``.
    Returns what the caller keeps alive as long as ``ctx`` (the ctypes callback, or
    ``"C"`` for the C callback, whose slot lives as long as the ``SSL_CTX``), or None when
    libssl cannot be reached (OpenSSL's per-process keys stay).

    The C callback (``_tickets.c``) is used when it was built and a slot is free; its twin
    is ``_ctypes_install``, same answers, about 12 µs more per ticket."""
    ptr = ctx_pointer(ctx)
    if ptr is None:
        return None
    if native_error() is None and _native.install(ptr, keys):
        return "C"
    return _ctypes_install(ctx, keys)


def _ctypes_install(ctx: ssl.SSLContext, keys: TicketKeys) -> Callable[..., int] | None:
    """The pure-Python twin of the C callback: a ctypes callback, returned for the caller to
    keep alive as long as ``ctx``."""
    lib, ptr = libssl(), ctx_pointer(ctx)
    if lib is None or ptr is None:
        return None
    cipher = lib.cipher
    c = lib.lib

    def callback(_ssl: Any, key_name: int, iv: int, cctx: int, hctx: int, enc: int) -> int:
        try:
            if enc:
                key = keys.encrypting()
                if key is None:
                    return 0  # no ticket
                fresh = os.urandom(16)
                ctypes.memmove(key_name, key.name, _NAME)
                ctypes.memmove(iv, fresh, 16)
                if c.EVP_EncryptInit_ex(cctx, cipher, None, key.aes, fresh) != 1:
                    return -1
                if lib.mac_init(hctx, key.hmac) != 1:
                    return -1
                keys.issued += 1
                return 1
            found = keys.find(ctypes.string_at(key_name, _NAME))
            if found is None:
                keys.unknown += 1
                return 0  # a full handshake (and a new ticket)
            key = found[0]
            if c.EVP_DecryptInit_ex(cctx, cipher, None, key.aes, ctypes.string_at(iv, 16)) != 1:
                return -1
            if lib.mac_init(hctx, key.hmac) != 1:
                return -1
            keys.accepted += 1
            # 2: accepted, and a fresh ticket issued (under the current key) with every
            # resumption: TLS 1.3 tickets are for one use (RFC 8446 §C.4) and an OpenSSL
            # client (wrk, curl, most HTTP libraries) never offers one twice, so without a
            # fresh one every other connection of a returning client was a full handshake
            return 2
        except Exception:
            # a broken key lookup costs the ticket (a full handshake, or no new ticket),
            # not the connection
            log.exception("TLS ticket key callback failed")
            return 0

    cb = _EVP_CB(callback)
    if lib.evp:
        ok = c.SSL_CTX_set_tlsext_ticket_key_evp_cb(ptr, cb)
    else:
        ok = c.SSL_CTX_callback_ctrl(ptr, _SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB, cb)
    if not ok:
        return None
    return cb
