"""Balancing policies: pure, synchronous, no clocks of their own, no health.

A policy is built from the group's backends, a random source and, for the load-aware ones,
the group's :class:`Load`::

    picker = build(policy_config, backends, rng, load, now)
    for backend in picker.candidates(key):   # preference order, each backend at most once
        if usable(backend): break            # the caller filters healthy / enabled / tried
    backend = picker.pick(key, up, tried)    # the same for the usual filter, made cheap

Keeping health out of the policy means a retry simply takes the next candidate, and a
health change never rebuilds (or resets) a picker.
"""

from __future__ import annotations

import dataclasses
import random
import secrets
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from poise.balancing.base import Picker
from poise.balancing.consistent import ALGORITHMS
from poise.balancing.hashing import HashPick
from poise.balancing.keys import KeySource
from poise.balancing.load import Load
from poise.balancing.loadaware import LeastConn, PeakEwma, PowerOfTwo
from poise.balancing.names import KEYED, LOAD_AWARE, POLICIES, WITH_FALLBACK
from poise.balancing.round_robin import RoundRobin
from poise.balancing.simple import First, RandomPick, SmoothWeightedRoundRobin, WeightedRandom
from poise.balancing.sticky import StickyPick
from poise.models import Backend

if TYPE_CHECKING:  # config imports balancing.keys/names: no runtime import back into config
    from poise.config.model import PolicyConfig

__all__ = [
    "KEYED",
    "LOAD_AWARE",
    "POLICIES",
    "KeySource",
    "Load",
    "Picker",
    "StickyPick",
    "build",
    "needs_load",
    "new_load",
]


def new_load(policy: PolicyConfig, n: int) -> Load | None:
    """The Load a policy reads, or None; latency is tracked only for peak_ewma."""
    if not needs_load(policy):
        return None
    name = policy.fallback if policy.name in WITH_FALLBACK else policy.name
    return Load(n, latency=name == "peak_ewma")


def needs_load(policy: PolicyConfig) -> bool:
    name = policy.fallback if policy.name in WITH_FALLBACK else policy.name
    return name in LOAD_AWARE or (
        policy.name == "consistent_hash" and policy.balance_factor is not None
    )


def build(
    policy: PolicyConfig,
    backends: Sequence[Backend],
    rng: random.Random,
    load: Load | None = None,
    now: Callable[[], float] | None = None,
) -> Picker:
    name = policy.name
    if load is None:
        load = new_load(policy, len(backends))
    if name == "round_robin":
        return RoundRobin(backends, rng)
    if name == "weighted_round_robin":
        return SmoothWeightedRoundRobin(backends, rng)
    if name == "random":
        return RandomPick(backends, rng)
    if name == "weighted_random":
        return WeightedRandom(backends, rng)
    if name == "first":
        return First(backends, rng)
    if name == "least_conn":
        assert load is not None
        return LeastConn(backends, rng, load)
    if name == "p2c":
        assert load is not None
        return PowerOfTwo(backends, rng, load, policy.bias)
    if name == "peak_ewma":
        assert load is not None
        return PeakEwma(backends, rng, load, now or (lambda: 0.0))
    fallback = build(dataclasses.replace(policy, name=policy.fallback), backends, rng, load, now)
    if name == "sticky":
        secret = policy.secret.encode() if policy.secret else secrets.token_bytes(32)
        return StickyPick(backends, rng, fallback, policy.cookie, secret)
    default = policy.default_key.encode() if policy.default_key is not None else None
    if name == "hash":
        return HashPick(backends, rng, default, fallback)
    if name == "consistent_hash":
        return ALGORITHMS[policy.algorithm](
            backends, rng, load, policy.balance_factor, default_key=default, fallback=fallback
        )
    raise ValueError(f"unknown policy {name!r}")  # config validation prevents this
