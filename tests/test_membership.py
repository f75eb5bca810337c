"""membership.py: the one owner of the upstreams' backends and the routing table.

Driven without sockets or a serving loop: a ``Membership`` over a parsed config, attached to
a stand-in data plane (the table it reads, the loop's scheduler) where the test needs one.
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

from poise import messages
from poise.config import parse_config
from poise.config.model import Config
from poise.membership import Membership
from poise.reload import apply

DOC: dict[str, Any] = {
    "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
    "upstreams": {
        "app": {
            "backends": ["http://127.0.0.1:9", "http://127.0.0.1:10"],
            "limits": {"max_requests": 5},
        },
        "old": {"backends": ["http://127.0.0.1:11"]},
    },
}


def membership(doc: dict[str, Any] = DOC) -> tuple[Membership, Config]:
    config = parse_config(doc)
    return Membership(config, random.Random(1), {}), config


class DataPlane(SimpleNamespace):
    """What ``attach`` touches of a Context: the table, the ejection hook, the loop."""

    def __init__(self) -> None:
        scheduled: list[Any] = []
        super().__init__(table=None, on_ejected=None, scheduled=scheduled)
        self.loop = SimpleNamespace(call_soon=scheduled.append)


def test_every_change_is_published_to_the_data_plane_as_one_table() -> None:
    m, _ = membership()
    before = m.table
    m.set_members("app", before.groups["app"].config.backends[:1], initial=True)
    assert m.table is not before  # before serving: the table is replaced, nothing else
    ctx = DataPlane()
    m.attach(ctx)  # type: ignore[arg-type]
    assert ctx.table is m.table
    assert m.table.groups["app"].admission is not None  # its queue runs on the loop now
    for change in (
        lambda: m.add_backend("app", "http://127.0.0.1:12"),
        lambda: m.set_backend_state("app", "127.0.0.1:9", "drain"),  # via the board's view
        lambda: m.publish_health("app", (True, False)),
        lambda: m.remove_backend("app", "127.0.0.1:12"),
    ):
        seen = m.table
        change()
        assert m.table is not seen and ctx.table is m.table
    assert [b.authority for b in m.table.groups["app"].backends] == ["127.0.0.1:9"]
    assert m.table.groups["app"].up == (False,)  # drained


def test_changes_are_replicated_in_a_control_process() -> None:
    m, _ = membership()
    sent: list[messages.Replicated] = []
    m.replicate = sent.append
    m.add_backend("app", "http://127.0.0.1:12", weight=3)
    m.set_backend_state("app", "127.0.0.1:10", "maint")
    m.publish_health("app", (True, True, False))
    kinds = [type(x) for x in sent]
    assert kinds == [messages.Members, messages.State, messages.Health]
    members = sent[0]
    assert isinstance(members, messages.Members)
    assert [b.weight for b in members.backends] == [1, 1, 3]


def test_static_changes_are_refused_for_discovered_upstreams_and_unknown_names() -> None:
    doc = {**DOC, "upstreams": {**DOC["upstreams"], "svc": {"service": "users"}}}
    m, _ = membership(doc)
    for call, error in (
        (lambda: m.add_backend("svc", "http://127.0.0.1:12"), ValueError),
        (lambda: m.add_backend("nope", "http://127.0.0.1:12"), KeyError),
        (lambda: m.remove_backend("app", "127.0.0.1:99"), KeyError),
        (lambda: m.add_backend("app", "http://127.0.0.1:9"), ValueError),
    ):
        try:
            call()
        except error:
            continue
        raise AssertionError("not refused")


async def test_a_reload_switches_once_and_retires_the_removed_groups_pools() -> None:
    m, config = membership()
    ctx = DataPlane()
    ctx.configure = lambda new: setattr(ctx, "configured", new)
    m.attach(ctx)  # type: ignore[arg-type]
    old_pool = m.table.groups["old"].pools[0]
    staying = m.table.groups["app"].pools[0]
    doc = {**DOC, "upstreams": {"app": DOC["upstreams"]["app"]}}
    new = parse_config(doc)
    changed = await apply(m, new, addresses={}, tls={})
    assert changed == {"added": [], "changed": [], "removed": ["old"]}
    assert m.config is new and ctx.configured is new and ctx.table is m.table
    assert "old" not in m.table.groups and "old" not in m.board.statuses
    assert old_pool.max_idle == 0  # retired: its busy connections close when they finish
    assert m.table.groups["app"].pools[0] is staying and staying.max_idle > 0
    assert config is not new
