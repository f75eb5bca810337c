"""``poise demo``: three demo backends on ephemeral loopback ports and a balancer in front."""

from __future__ import annotations

import asyncio
import signal
import sys

from poise.config import parse_config
from poise.logs import setup_logging
from poise.server import Server, install_uvloop
from poise.testing import HttpBackend


def demo(listen: str, log_level: str, log_format: str) -> int:
    setup_logging(log_level, log_format)
    install_uvloop()
    try:
        return asyncio.run(_demo(listen))
    except OSError as exc:
        print(f"poise demo: cannot listen on {listen}: {exc.strerror or exc}", file=sys.stderr)
        print("  try another address: poise demo --listen 127.0.0.1:8081", file=sys.stderr)
        return 1


async def _demo(listen: str) -> int:
    backends = [HttpBackend(name=f"demo-{i}") for i in (1, 2, 3)]
    for b in backends:
        await b.start()
    try:
        config = parse_config(
            {"port": listen, "healthCheckInterval": "2s", "servers": [b.url for b in backends]},
            source="poise demo",
        )
        server = Server(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        serving = asyncio.create_task(server.serve())
        started = asyncio.create_task(server.started.wait())
        await asyncio.wait({serving, started}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            started.cancel()
            serving.result()  # raises the start-up error (e.g. port in use)
            return 1
        host, port = server.addresses["default"]
        shown = f"[{host}]" if ":" in host else host
        print(
            "\npoise demo is running\n"
            f"  balancer:  http://{shown}:{port}/\n"
            + "".join(f"  backend:   {b.url}  ({b.name})\n" for b in backends)
            + f"\nTry:  curl http://{shown}:{port}/   (each request goes to the next backend)\n"
            "Press Ctrl-C to stop.\n",
            flush=True,
        )
        await serving
    finally:
        for b in backends:
            await b.stop()
    return 0
