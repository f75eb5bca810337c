"""The HTTP/2 tests run each case with both framing engines (h2/engine.py): libnghttp2
through ngh2, and its pure-Python twin over h2."""

from __future__ import annotations

import pytest

from poise.h2 import engine


@pytest.fixture(params=["native", "pure"])
def h2_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    kind = str(request.param)
    assert kind in engine.available(), f"the {kind} HTTP/2 engine is not installed"
    monkeypatch.setenv("POISE_H2_ENGINE", kind)
    return kind
