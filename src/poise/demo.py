"""``poise demo``: three demo backends on ephemeral loopback ports and a balancer in front;
``/svc`` routes to service ``demo`` in the embedded registry (in memory), where one backend
is registered and more can be, with curl."""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys

from poise.config import parse_config
from poise.logs import setup_logging
from poise.registry import Instance
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
    token = secrets.token_urlsafe(18)
    backends = [HttpBackend(name=f"demo-{i}") for i in (1, 2, 3)]
    for b in backends:
        await b.start()
    try:
        config = parse_config(
            {
                "listeners": [
                    {
                        "name": "default",
                        "listen": listen,
                        "routes": [{"path": "/svc", "upstream": "svc"}, {"upstream": "static"}],
                    }
                ],
                "upstreams": {
                    "static": {
                        "backends": [b.url for b in backends],
                        "health_check": {"interval": "2s"},
                    },
                    "svc": {"service": "demo", "health_check": {"interval": "2s"}},
                },
                "registry": {"store": "memory", "listen": "127.0.0.1:0"},
                "admin": {"listen": "127.0.0.1:0", "token": token},
            },
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
        assert server.registry is not None and server.registry_address is not None
        await server.registry.store.register(_instance(backends[0], "demo-1"))
        reg_host, reg_port = server.registry_address
        reg = f"http://{reg_host}:{reg_port}"
        assert server.admin_address is not None
        adm_hostport = "{}:{}".format(*server.admin_address)
        adm = f"http://{adm_hostport}"
        b2 = backends[1]
        print(
            "\npoise demo is running\n"
            f"  balancer:  http://{shown}:{port}/\n"
            + "".join(f"  backend:   {b.url}  ({b.name})\n" for b in backends)
            + f"  registry:  {reg}/v1/services  (service 'demo' is routed at /svc)\n"
            f"  dashboard: {adm}/#token={token}\n"
            f"  metrics:   curl -H 'Authorization: Bearer {token}' {adm}/metrics\n"
            # (--token=: a URL-safe token may begin with "-", which argparse would take
            # for an option of its own)
            f"  status:    poise status --admin {adm_hostport} --token={token}\n"
            "             (this run's admin port and token; a config sets both in its"
            " admin section)\n"
            f"\nTry:  curl http://{shown}:{port}/   (each request goes to the next backend)\n"
            f"      curl http://{shown}:{port}/svc   (the instances registered as 'demo')\n"
            f"      curl -X PUT {reg}/v1/services/demo/instances/demo-2 "
            f'-H \'Content-Type: application/json\' -d \'{{"host": "{b2.host}", '
            f'"port": {b2.port}}}\'\n'
            "Press Ctrl-C to stop.\n",
            flush=True,
        )
        await serving
    finally:
        for b in backends:
            await b.stop()
    return 0


def _instance(backend: HttpBackend, iid: str) -> Instance:
    host, port = backend.url.split("//", 1)[1].rsplit(":", 1)
    return Instance("demo", iid, host, int(port))
