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
    Config,
    HealthCheckConfig,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    PolicyConfig,
    PoolConfig,
    ProxyConfig,
    RouteConfig,
    TimeoutConfig,
    UpstreamConfig,
)
from poise.errors import ConfigError

__all__ = [
    "BackendConfig",
    "Config",
    "ConfigError",
    "HealthCheckConfig",
    "LimitsConfig",
    "ListenerConfig",
    "LogConfig",
    "PolicyConfig",
    "PoolConfig",
    "ProxyConfig",
    "RouteConfig",
    "TimeoutConfig",
    "UpstreamConfig",
    "load_config",
    "parse_backend_url",
    "parse_config",
    "parse_duration",
    "parse_listen",
]
