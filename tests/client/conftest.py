from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client.support import Harness

TOKEN = "client-token-0123456789"


@pytest.fixture
def registry() -> Iterator[Harness]:
    harness = Harness(token=TOKEN)
    try:
        yield harness
    finally:
        harness.close()
