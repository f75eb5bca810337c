"""Fixtures shared by the integration tests (pytest finds them here)."""

from tests.integration.l4support import engine

__all__ = ["engine"]
