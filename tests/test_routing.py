from __future__ import annotations

import random

from poise.config import parse_config
from poise.health.status import View
from poise.routing import RoutingTable, build_table


def table_for(routes: list[dict[str, object]]) -> RoutingTable:
    doc = {
        "listeners": [{"name": "l", "listen": "127.0.0.1:0", "routes": routes}],
        "upstreams": {
            "a": {"backends": ["http://127.0.0.1:1"]},
            "b": {"backends": ["http://127.0.0.1:2", "http://127.0.0.1:3"]},
            "c": {"backends": ["http://127.0.0.1:4"]},
        },
    }
    return build_table(parse_config(doc), random.Random(0))


def test_host_routes_before_catch_all_and_longest_prefix_wins() -> None:
    t = table_for(
        [
            {"upstream": "a"},
            {"path": "/api", "upstream": "b"},
            {"host": "x.test", "upstream": "c"},
        ]
    )
    assert t.route("l", b"x.test", b"/api/v1").name == "c"
    assert t.route("l", b"other", b"/api/v1").name == "b"
    assert t.route("l", b"other", b"/").name == "a"
    assert t.catch_all == {}


def test_unmatched_is_none() -> None:
    t = table_for([{"host": "x.test", "upstream": "a"}])
    assert t.route("l", b"y.test", b"/") is None


def test_single_catch_all_listener_is_precomputed() -> None:
    t = table_for([{"upstream": "b"}])
    assert t.catch_all == {"l": "b"}


def test_health_update_is_a_new_table_sharing_the_picker() -> None:
    t = table_for([{"upstream": "b"}])
    g = t.groups["b"]
    t2 = t.with_group(g.with_view(View((True, False))))
    assert t.groups["b"].up == (True, True)  # the old table is untouched
    assert t2.groups["b"].up == (True, False)
    assert t2.groups["b"].picker is g.picker
    assert t2.catch_all == t.catch_all
    assert [b.index for b in t2.groups["b"].backends] == [0, 1]
