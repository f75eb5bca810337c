"""Configuration: frozen dataclasses (``model``) and the loader that builds them (``load``)."""

from poise.config.load import (
    load_config,
    parse_backend_url,
    parse_config,
    parse_duration,
    parse_listen,
)
from poise.config.model import (
    BackendConfig,
    CertificateConfig,
    Config,
    HealthCheckConfig,
    LimitsConfig,
    ListenerConfig,
    ListenerTlsConfig,
    LogConfig,
    PolicyConfig,
    PoolConfig,
    ProxyConfig,
    RedirectConfig,
    RouteConfig,
    TimeoutConfig,
    UpstreamConfig,
    UpstreamTlsConfig,
)
from poise.errors import ConfigError

__all__ = [
    "BackendConfig",
    "CertificateConfig",
    "Config",
    "ConfigError",
    "HealthCheckConfig",
    "LimitsConfig",
    "ListenerConfig",
    "ListenerTlsConfig",
    "LogConfig",
    "PolicyConfig",
    "PoolConfig",
    "ProxyConfig",
    "RedirectConfig",
    "RouteConfig",
    "TimeoutConfig",
    "UpstreamConfig",
    "UpstreamTlsConfig",
    "load_config",
    "parse_backend_url",
    "parse_config",
    "parse_duration",
    "parse_listen",
]
