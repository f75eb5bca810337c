"""The supervisor-worker link and the shared sockets (``poise.workers``), without processes."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from poise.config import parse_config
from poise.server import Server
from poise.workers import Link, apply_sync, frame, listen_sockets


def test_frames_are_decoded_whole_fed_at_once_or_byte_by_byte() -> None:
    config = parse_config({"port": "127.0.0.1:0", "servers": ["http://127.0.0.1:9"]})
    messages: list[tuple[Any, ...]] = [
        ("health", "app", (True, False)),
        ("reload", config),  # frozen configs with mapping proxies travel too
        ("state", "app", "127.0.0.1:9", "drain"),
    ]
    data = b"".join(frame(m) for m in messages)
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        got: list[tuple[Any, ...]] = []
        link = Link(got.append)
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
        control.add_backend("app", "http://127.0.0.1:11")
        control.publish_health("app", (True, False, True))
        control.set_backend_state("app", "127.0.0.1:9", "drain")
        worker = Server(parse_config(doc), role="worker")
        apply_sync(
            worker,
            {
                name: (
                    group.config.backends,
                    list(control.board.statuses[name].reported),
                    tuple(control.board.statuses[name].healthy),
                    list(control.board.statuses[name].admin),
                )
                for name, group in control.table.groups.items()
            },
        )
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
        sent: list[tuple[Any, ...]] = []
        control.replicate = sent.append
        control.publish_health("app", (False, True))
        for message in sent:
            await apply(worker, message)
        assert worker.table.groups["app"].up == (False, True)
        sent.clear()
        await control.reload(parse_config(doc(False)))
        assert control.table.groups["app"].up == (True, True)
        # what the supervisor sends on a reload (workers._replicate): the config, then a sync
        await apply(worker, ("reload", control.config))
        assert worker.table.groups["app"].up == (True, True)

    asyncio.run(main())
