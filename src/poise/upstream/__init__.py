"""Upstream connection management: keep-alive pools per backend."""
