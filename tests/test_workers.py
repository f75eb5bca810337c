"""The supervisor-worker link and the shared sockets (``poise.workers``), without processes."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from poise.config import parse_config
from poise.messages import Health, Reload, Replicated, State, ToWorker
from poise.server import Server
from poise.workers import Link, frame, listen_sockets


def test_frames_are_decoded_whole_fed_at_once_or_byte_by_byte() -> None:
    config = parse_config({"port": "127.0.0.1:0", "servers": ["http://127.0.0.1:9"]})
    messages: list[ToWorker] = [
        Health("app", (True, False)),
        Reload(config),  # frozen configs with mapping proxies travel too
        State("app", "127.0.0.1:9", "drain"),
    ]
    data = b"".join(frame(m) for m in messages)
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        got: list[ToWorker] = []
        link: Link[ToWorker] = Link(got.append)
        for chunk in chunks:
            link.data_received(chunk)
        assert got == messages
        assert not link.buf  # nothing left over


def test_each_slot_gets_its_own_socket_on_one_port() -> None:
    slots = listen_sockets("127.0.0.1", 0, 3)
    try:
        assert [len(s) for s in slots] == [1, 1, 1]
        ports = {s[0].getsockname()[1] for s in slots}
        assert len(ports) == 1 and ports != {0}
        fds = {s[0].fileno() for s in slots}
        assert len(fds) == 3
        assert all(s[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in slots)
        # a client reaches one of them
        port = ports.pop()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        for slot in slots:
            for s in slot:
                s.close()


def test_a_sync_makes_a_workers_state_the_supervisors() -> None:
    doc = {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": {"backends": ["http://127.0.0.1:9", "http://127.0.0.1:10"]}},
    }

    async def main() -> None:
        control = Server(parse_config(doc), role="control")
        control.membership.add_backend("app", "http://127.0.0.1:11")
        control.membership.publish_health("app", (True, False, True))
        control.membership.set_backend_state("app", "127.0.0.1:9", "drain")
        worker = Server(parse_config(doc), role="worker")
        worker.membership.apply_shared(control.membership.shared_state())
        assert worker.table.groups["app"].config.backends == (
            control.table.groups["app"].config.backends
        )
        assert worker.table.groups["app"].up == control.table.groups["app"].up
        assert worker.table.groups["app"].up == (False, False, True)

    asyncio.run(main())


def test_a_reload_turning_health_checks_off_brings_the_workers_down_backends_back() -> None:
    """The control process replicates a DOWN verdict, then a reload turns the checks off:
    every worker, like the control process, routes to that backend again."""
    from poise.workers import apply

    def doc(enabled: bool) -> dict[str, Any]:
        return {
            "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
            "upstreams": {
                "app": {
                    "backends": ["http://127.0.0.1:9", "http://127.0.0.1:10"],
                    "health_check": {"enabled": enabled},
                }
            },
        }

    async def main() -> None:
        control = Server(parse_config(doc(True)), role="control")
        worker = Server(parse_config(doc(True)), role="worker")
        sent: list[Replicated] = []
        control.membership.replicate = sent.append
        control.membership.publish_health("app", (False, True))
        for message in sent:
            await apply(worker, message)
        assert worker.table.groups["app"].up == (False, True)
        sent.clear()
        await control.reload(parse_config(doc(False)))
        assert control.table.groups["app"].up == (True, True)
        # what the supervisor sends on a reload (workers._replicate): the config, then a sync
        await apply(worker, Reload(control.config))
        assert worker.table.groups["app"].up == (True, True)

    asyncio.run(main())


def test_every_message_kind_travels_through_the_link_and_is_handled() -> None:
    """Each message class of ``poise.messages``, pickled and framed, comes out equal at the
    other end, and the receiver's dispatcher handles it (a new kind must be added here)."""
    from typing import cast, get_args

    from poise import messages as m
    from poise.workers import Supervisor, Worker, apply

    doc = {
        "listeners": [{"name": "web", "listen": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": {"backends": ["http://127.0.0.1:9", "http://127.0.0.1:10"]}},
    }

    async def main() -> None:
        config = parse_config(doc)
        control = Server(config, role="control")
        control.membership.add_backend("app", "http://127.0.0.1:11")
        added = control.table.groups["app"].config.backends
        control.membership.set_backend_state("app", "127.0.0.1:10", "maint")
        moved = parse_config({**doc, "timeouts": {"upstream_connect": 7}})
        to_worker: list[m.ToWorker] = [
            m.Init(0, config, {"web": [3]}, "info", "text", control.membership.shared_state(), {}),
            m.Members("app", added, [True, True, False], False),
            m.Health("app", (False, True, True)),
            m.Passed("app", 0, 1.5),
            m.State("app", "127.0.0.1:9", "drain"),
            m.Reload(moved),
            m.Sync(control.membership.shared_state()),
            m.Tickets({"web": {1: b"k" * 32}}),
        ]
        to_supervisor: list[m.ToSupervisor] = [m.Ready(), m.Report({"clients": 3})]
        assert {type(x) for x in to_worker} == set(get_args(m.ToWorker))
        assert {type(x) for x in to_supervisor} == set(get_args(m.ToSupervisor))

        got: list[m.ToWorker] = []
        link: Link[m.ToWorker] = Link(got.append)
        link.data_received(b"".join(frame(x) for x in to_worker))
        assert got == to_worker
        back: list[m.ToSupervisor] = []
        up_link: Link[m.ToSupervisor] = Link(back.append)
        up_link.data_received(b"".join(frame(x) for x in to_supervisor))
        assert back == to_supervisor

        worker = Server(parse_config(doc), role="worker")
        init, members, health, passed, state, reload, sync, tickets = got
        with pytest.raises(ValueError, match="second init"):
            await apply(worker, init)
        await apply(worker, members)
        assert worker.table.groups["app"].config.backends == added
        status = worker.membership.board.statuses["app"]  # a new one for the new members
        assert status.reported == [True, True, False]
        await apply(worker, health)
        assert tuple(status.healthy) == (False, True, True)
        await apply(worker, passed)  # no ejection to end: nothing changes
        await apply(worker, state)
        assert status.admin[0] == "drain"
        await apply(worker, reload)
        assert worker.config.timeouts.upstream_connect == 7
        await apply(worker, sync)
        assert worker.membership.shared_state() == control.membership.shared_state()
        await apply(worker, tickets)  # no HTTPS listener here: nothing to install

        sup = Supervisor(config, 1)
        one = Worker(0, cast(Any, None), up_link, 0.0)
        ready, report = back
        sup._on_message(one, ready)
        assert one.ready.is_set()
        sup._on_message(one, report)
        assert one.report == {"clients": 3}

    asyncio.run(main())
