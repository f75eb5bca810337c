"""Balancing policies: pure, synchronous, no clocks, no health.

A policy is built from the group's backends and a random source::

    picker = build(policy_config, backends, rng)
    for backend in picker.candidates(key):   # preference order, each backend at most once
        if usable(backend): break            # the caller filters healthy / enabled / tried

Keeping health out of the policy means a retry simply takes the next candidate, and a
health change never rebuilds (or resets) a picker.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Protocol

from poise.balancing.round_robin import RoundRobin
from poise.config.model import PolicyConfig
from poise.models import Backend

__all__ = ["POLICIES", "Picker", "RoundRobin", "build"]


class Picker(Protocol):
    def candidates(self, key: bytes | None = None) -> Iterable[Backend]:
        """Every backend at most once, best first. Iterated lazily by the caller, which
        usually stops at the first usable one."""
        ...


POLICIES = ("round_robin",)


def build(policy: PolicyConfig, backends: Sequence[Backend], rng: random.Random) -> Picker:
    if policy.name == "round_robin":
        return RoundRobin(backends, rng)
    raise ValueError(f"unknown policy {policy.name!r}")  # config validation prevents this
