"""The ``registry`` section's etcd node keys: node, advertise, node_ttl (docs/registry.md)."""

from __future__ import annotations

from typing import Any

import pytest

from poise.config import ConfigError, parse_config


def doc(**registry: Any) -> dict[str, Any]:
    return {
        "listeners": [{"listen": "127.0.0.1:8080", "upstream": "api"}],
        "upstreams": {"api": {"service": "users"}},
        "registry": registry,
    }


def test_the_node_keys_have_defaults_and_take_values() -> None:
    default = parse_config(doc(store="etcd")).registry
    assert default is not None
    assert (default.node, default.advertise, default.node_ttl) == (None, None, 10.0)
    set_ = parse_config(
        doc(store="etcd", node="lb-1", advertise="http://10.0.0.5:8500/", node_ttl="30s")
    ).registry
    assert set_ is not None
    assert (set_.node, set_.advertise, set_.node_ttl) == ("lb-1", "http://10.0.0.5:8500", 30.0)


def test_every_bad_node_key_is_reported_with_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc(store="etcd", node="no spaces", advertise="10.0.0.5:8500", node_ttl="1s"))
    problems = info.value.problems
    assert any(p.startswith("registry.node:") and "node name" in p for p in problems), problems
    assert any(p.startswith("registry.advertise:") and "http://" in p for p in problems)
    assert any(p.startswith("registry.node_ttl:") and "2s" in p for p in problems)
    assert len(problems) == 3


def test_the_node_keys_are_for_etcd_only() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc(store="sqlite", node="lb-1", node_ttl="5s"))
    problems = info.value.problems
    assert any(p.startswith("registry.node:") and "only for store 'etcd'" in p for p in problems)
    assert any(
        p.startswith("registry.node_ttl:") and "only for store 'etcd'" in p for p in problems
    )
