"""Typed, frozen configuration. Built only by ``poise.config.load``; never mutated.

Durations are float seconds. Every default here is the documented default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class BackendConfig:
    url: str  # as written by the user, e.g. "http://localhost:5001"
    scheme: str  # "http" | "https"
    host: str  # "localhost" (IPv6 without brackets)
    port: int  # 5001 (default 80 for http, 443 for https)
    weight: int = 1
    # operator state, separate from health: enabled | drain (no new requests but sticky
    # ones; in-flight ones finish) | maint (no requests at all)
    state: str = "enabled"


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    enabled: bool = True
    type: str = "http"  # "http" | "tcp" | "grpc" (grpc.health.v1.Health/Check)
    method: str = "HEAD"
    path: str = "/"
    host: str | None = None  # Host header sent; None = the backend's host[:port]
    # inclusive ranges; the seed's behaviour is "only 200 is healthy"
    expected_status: tuple[tuple[int, int], ...] = ((200, 200),)
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 1
    fall: int = 1
    headers: tuple[tuple[str, str], ...] = ()  # extra request header fields (http)
    body: str | None = None  # regex the response body must contain (searched, first 64 KiB)
    port: int | None = None  # probe this port instead of the backend's
    jitter: float = 0.1  # each wait is interval ± this fraction of it
    unhealthy_interval: float | None = None  # probe DOWN backends this often; None = interval
    history: int = 10  # probe results kept per backend (for the admin API and dashboard)
    send: bytes | None = None  # tcp: bytes written once connected
    expect: bytes | None = None  # tcp: bytes the backend must answer with (a substring)
    service: str = ""  # grpc: the service whose health is asked ("": the server's)


@dataclass(frozen=True, slots=True)
class PassiveConfig:
    """Outlier ejection from live traffic (Envoy's consecutive-errors detector)."""

    enabled: bool = True
    # connect errors, resets, timeouts and the ``statuses`` below, in a row
    consecutive_failures: int = 5
    statuses: tuple[tuple[int, int], ...] = ()  # response statuses counted as failures
    base_ejection: float = 30.0  # ejection n lasts base_ejection * n ...
    max_ejection: float = 300.0  # ... up to this
    max_ejected_percent: int = 50  # never eject more than this share of a group at once
    retry_after: bool = True  # a 503 with Retry-After ejects the backend for that long


@dataclass(frozen=True, slots=True)
class RetryConfig:
    attempts: int = 3  # tries in total, the first included; each goes to another backend
    # when to try again: "connect" (never reached a backend: any method), "reset" (connection
    # lost before any response byte), "timeout" (no response within the per-try timeout)
    on: tuple[str, ...] = ("connect", "reset", "timeout")
    statuses: tuple[int, ...] = ()  # also retry these responses (e.g. 502, 503, 504)
    per_try_timeout: float | None = None  # None = timeouts.upstream_response
    # the longest a request waits for its response head over all its tries, from its first
    # try on (Envoy's route timeout, nginx's proxy_next_upstream_timeout); None =
    # timeouts.upstream_response, so retries never make a client wait longer than one try may
    timeout: float | None = None
    idempotency_key: bool = False  # a request with an Idempotency-Key header may be retried
    budget_percent: int = 20  # retries in flight <= this share of requests in flight ...
    budget_min: int = 3  # ... but this many concurrent retries are always allowed
    max_body: int = 64 * 1024  # request bodies up to this size are kept for a retry


@dataclass(frozen=True, slots=True)
class UpstreamLimitsConfig:
    max_requests_per_backend: int = 0  # concurrent requests per backend; 0 = no limit
    max_requests: int = 0  # concurrent requests for the whole group; 0 = no limit
    max_pending: int = 1024  # requests waiting for a free slot; beyond -> 503
    queue_timeout: float = 5.0  # longest wait for a slot; then 503


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    name: str = "round_robin"
    # hash / consistent_hash: where the key comes from ("ip", "uri", "header:X-User",
    # "cookie:sid", "query:key"), what to use when a request lacks it, else which keyless
    # policy takes such requests
    key: str | None = None
    default_key: str | None = None
    fallback: str = "round_robin"
    algorithm: str = "ring"  # consistent_hash: ring | maglev | rendezvous
    balance_factor: float | None = None  # consistent_hash: bounded load, e.g. 1.25
    bias: float = 1.0  # p2c with unequal weights: score = weight / (active + 1) ** bias
    cookie: str = "poise_sticky"  # sticky: the cookie's name
    secret: str | None = None  # sticky: HMAC key; None = random per process (one instance)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    max_idle: int = 64  # idle keep-alive connections kept per backend
    # shorter than the shortest common backend keep-alive (Node.js: 5 s)
    idle_timeout: float = 4.0


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    """TLS towards the https:// backends of an upstream (config/tls.py)."""

    ca: str | None = None  # CA bundle to verify backends with; None = the system store
    verify: bool = True  # False: accept any certificate (testing only)
    server_name: str | None = None  # SNI and verified name; None = each backend's host
    cert: str | None = None  # client certificate presented to backends (mTLS)
    key: str | None = None
    min_version: str = "1.2"  # "1.2" | "1.3"
    ciphers: str | None = None  # OpenSSL cipher string for TLS 1.2; None = OpenSSL's


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """Backends from DNS: A/AAAA records of ``name`` on ``port``, or SRV records."""

    name: str
    type: str = "A"  # A (A and AAAA) | SRV
    port: int = 80  # for A; SRV records carry their own
    scheme: str = "http"
    refresh: float = 10.0  # seconds between lookups
    nameserver: tuple[str, int] | None = None  # None = the system resolver


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    backends: tuple[BackendConfig, ...]
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    passive: PassiveConfig = field(default_factory=PassiveConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    limits: UpstreamLimitsConfig = field(default_factory=UpstreamLimitsConfig)
    # below this share (percent) of usable backends healthy, route across all of them rather
    # than overload the few (Envoy's panic mode); 0 = never, the default (as nginx and
    # HAProxy behave: a backend that refuses connections is not "possibly healthy")
    panic_threshold: int = 0
    slow_start: float = 0.0  # seconds over which a (re)joining backend ramps up; 0 = off
    # backends discovered in the service registry under this name (``backends`` is then
    # the current set of instances, replaced as they come and go)
    service: str | None = None
    file: str | None = None  # backends listed in this file, re-read when it changes
    dns: DnsConfig | None = None  # backends from DNS, looked up every ``refresh``
    tls: UpstreamTlsConfig | None = None  # None: defaults, for https:// backends
    # what poise speaks to the backends: "http1" (HTTP/1.1, pooled keep-alive connections),
    # "h2" (HTTP/2, multiplexed: h2c to http:// backends, ALPN h2 to https:// ones) or
    # "grpc" (h2, with gRPC's rules: trailers, grpc-status answers, grpc-timeout, health)
    protocol: str = "http1"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    upstream: str  # name of an UpstreamConfig
    hosts: tuple[str, ...] = ()  # lower-case, no port; empty = any host
    path_prefix: str = "/"


@dataclass(frozen=True, slots=True)
class SniRouteConfig:
    """TLS passthrough: connections whose ClientHello names one of ``names`` (exact, or
    ``*.suffix``: one label) go to ``upstream`` (config/l4.py, l4/sni.py)."""

    names: tuple[str, ...]  # lower-case, no trailing dot
    upstream: str


@dataclass(frozen=True, slots=True)
class TcpListenerConfig:
    """A TCP (L4) listener: every connection is relayed to a backend of ``upstream`` (or, with
    ``sni`` routes, of the upstream its TLS ClientHello's server name picks)."""

    upstream: str
    idle_timeout: float = 3600.0  # no byte either way for this long -> both sides closed
    max_connections: int = 10000  # open connections on this listener; 0 = no limit
    connect_timeout: float | None = None  # per backend tried; None = timeouts.upstream_connect
    proxy_protocol: int = 0  # PROXY header sent to backends: 0 = none, 1 = v1, 2 = v2
    accept_proxy: tuple[str, ...] = ()  # CIDRs of peers that must open with a PROXY header
    sni: tuple[SniRouteConfig, ...] = ()  # routes by TLS server name; () = no peeking


@dataclass(frozen=True, slots=True)
class CertificateConfig:
    cert: str  # PEM certificate chain file, leaf first
    key: str  # PEM private key file
    # SNI names it serves: "a.example.com" or "*.example.com"; () = the certificate's own
    # subjectAltName DNS names (else its common name)
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ListenerTlsConfig:
    """An HTTPS listener (config/tls.py)."""

    certificates: tuple[CertificateConfig, ...]  # [0] is the default certificate
    min_version: str = "1.2"  # "1.2" | "1.3"
    max_version: str = "1.3"
    ciphers: str | None = None  # OpenSSL cipher string for TLS 1.2; None = OpenSSL's
    client_ca: str | None = None  # CA bundle: verify client certificates (mTLS)
    client_auth: str = "required"  # with client_ca: "required" | "optional"
    client_subject_header: str | None = None  # send the verified subject in this header
    strict: bool = False  # an expired certificate is an error, not a warning
    reload_interval: float = 10.0  # seconds between checks of the files; 0 = no watching
    session_resumption: bool = True  # False: no tickets, no session cache (tls/tickets.py)
    session_ticket_rotation: float = 3600.0  # seconds a generated ticket key encrypts
    session_ticket_keys: tuple[str, ...] = ()  # files of 80 random bytes: the first encrypts
    alpn: tuple[str, ...] = ("http/1.1",)  # offered in order; ("h2", "http/1.1") with HTTP/2


@dataclass(frozen=True, slots=True)
class Http2Config:
    """HTTP/2 towards clients on a listener (h2/front.py): ALPN ``h2`` on HTTPS listeners,
    prior-knowledge h2c on plain ones. The limits are what poise announces in SETTINGS."""

    max_concurrent_streams: int = 128  # streams a client may have open at once
    initial_window_size: int = 256 * 1024  # request body bytes in flight per stream
    max_frame_size: int = 16384
    max_header_list_size: int = 65536  # decoded header bytes of one request


@dataclass(frozen=True, slots=True)
class RedirectConfig:
    """A listener that only redirects to HTTPS."""

    status: int = 301  # 301 | 302 | 307 | 308
    port: int = 443  # the HTTPS port named in Location (443 is left out)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    host: str  # "" = all interfaces, else "127.0.0.1", "::1", ...
    port: int
    routes: tuple[RouteConfig, ...]  # empty for TCP and redirect listeners
    tls: ListenerTlsConfig | None = None  # HTTPS when set
    redirect: RedirectConfig | None = None  # set: no routes; every request -> https://
    protocol: str = "http"  # "http" | "tcp"
    tcp: TcpListenerConfig | None = None  # set exactly when protocol == "tcp"
    # HTTP/2 served when set: on by default on HTTPS listeners (ALPN), off on plain ones
    http2: Http2Config | None = None


@dataclass(frozen=True, slots=True)
class TimeoutConfig:
    client_header: float = 10.0  # whole request head must arrive within this
    client_idle: float = 60.0  # keep-alive connection with no request in flight
    upstream_connect: float = 3.0
    upstream_response: float = 60.0  # request fully sent -> response head received
    drain: float = 30.0  # graceful shutdown: in-flight requests get this long
    client_body: float = 60.0  # longest silence while a request body is being received
    client_send: float = 60.0  # a client that reads nothing of its response this long is cut off
    tunnel_idle: float = 3600.0  # an upgraded connection (WebSocket) silent this long is closed
    # draining: an idle keep-alive client connection stays open this long (at most drain) for
    # a request already on its way, served with Connection: close; then it is closed
    drain_idle: float = 1.0


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    x_forwarded: bool = True  # set X-Forwarded-For / -Proto / -Host
    x_forwarded_server: bool = False  # seed behaviour: response header naming the backend
    # Peers (CIDRs) whose X-Forwarded-* are believed. From them, X-Forwarded-For is appended
    # to and X-Forwarded-Proto/-Host kept; from anyone else all three are replaced.
    trusted_proxies: tuple[str, ...] = ()
    forwarded: bool = False  # also send RFC 7239 Forwarded: for=..;proto=..;host=..
    via: bool = False  # add "Via: 1.1 poise" to requests and responses


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_header_bytes: int = 64 * 1024  # request line + header fields; beyond -> 431
    max_headers: int = 100  # header fields; beyond -> 431
    max_target: int = 8192  # request-target bytes; beyond -> 414
    max_body_size: int = 0  # request body bytes; beyond -> 413 (0 = no limit)
    max_connections: int = 10000  # client connections per worker; beyond -> 503 and close
    # a request body must average this many bytes/s once 5 s have passed (slow POST); 0 = off.
    # 500 B/s is Apache mod_reqtimeout's default: far below any real link.
    min_body_rate: int = 500


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    path: str = "-"  # a file (appended to), or "-" for standard output
    format: str = "json"  # json | combined
    sample: float = 1.0  # share of requests logged


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"  # debug | info | warning | error
    format: str = "text"  # text | json
    access: AccessLogConfig | None = None  # None: no access log


def _empty_upstreams() -> Mapping[str, UpstreamConfig]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """The service registry poise embeds (or shares, with etcd)."""

    store: str = "sqlite"  # memory | sqlite | etcd
    path: str = "poise-registry.db"  # sqlite: the database file
    durable: bool = False  # sqlite: fsync every change (survives power loss, not just kill -9)
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)  # etcd
    prefix: str = "/poise"  # etcd: key prefix, so several registries can share one etcd
    # etcd: this poise node's name (stable across restarts: a restart keeps its instances);
    # None = "<hostname>:<registry API port>"
    node: str | None = None
    # etcd: the URL other nodes reach this node's registry API at (forwarded heartbeats);
    # None = the API's own address (the host name when it listens on every address)
    advertise: str | None = None
    node_ttl: float = 10.0  # etcd: the node's lease; its instances outlive its death this long
    listen: tuple[str, int] | None = ("127.0.0.1", 8500)  # the registry API; None = off
    # bearer token for writes (register, heartbeat, deregister); None = writes are open
    token: str | None = None
    read_token: bool = False  # also require the token to read
    history: int = 10_000  # events kept for watchers that resume


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin API, metrics and dashboard: their own listener, never the data plane's."""

    listen: tuple[str, int] = ("127.0.0.1", 9901)
    token: str | None = None  # bearer token; None = a random one, logged at start


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=_empty_upstreams)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # None: no registry (no upstream names a service, and no "registry" section)
    registry: RegistryConfig | None = None
    admin: AdminConfig | None = None  # None: no admin listener
    source: str | None = None  # file it was loaded from, for messages
    # problems worth telling but not refusing (an expired certificate without strict)
    warnings: tuple[str, ...] = ()
