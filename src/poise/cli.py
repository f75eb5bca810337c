"""Command line: argument parsing, then hand-off. No logic of its own."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from poise import __version__, build
from poise.errors import ConfigError, RegistryError

if TYPE_CHECKING:  # the CLI imports lazily, so `poise --help` starts fast
    from poise.config.model import ListenerConfig

EXAMPLES = """\
examples:
  poise demo                                   3 demo backends behind a balancer on 127.0.0.1:8080
  poise run -c poise.json                      run from a config file (JSON, TOML or YAML)
  poise run --listen :8080 --backend http://127.0.0.1:5001 --backend http://127.0.0.1:5002
  poise check -c poise.json                    validate a config file, list every problem
  poise simulate -c poise.json --latency 127.0.0.1:5002=50   see what a policy would do
  poise status --admin 127.0.0.1:9901 --token T   routes and backends of a running poise
                                               (needs an "admin" section in its config)
  poise register --service users --port 8001 -- python app.py   register while app.py runs
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="poise",
        description="poise: HTTP load balancer and service registry",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"poise {__version__} ({build()})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def logging_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--log-format", choices=("text", "json"), help="log line format")
        sp.add_argument(
            "--log-level", choices=("debug", "info", "warning", "error"), help="log level"
        )

    run = sub.add_parser("run", help="run the load balancer")
    run.add_argument("-c", "--config", help="config file (.json, .toml, .yaml)")
    run.add_argument("--listen", help="address to listen on, e.g. :8080 (without -c)")
    run.add_argument(
        "--backend", action="append", default=[], metavar="URL", help="backend URL (repeat)"
    )
    run.add_argument(
        "--health-interval", default="2s", help="health check interval without -c (default 2s)"
    )
    run.add_argument(
        "--watch-config", action="store_true", help="reload when the config file changes"
    )
    run.add_argument(
        "--workers", default="1", metavar="N",
        help="worker processes sharing the ports (SO_REUSEPORT), or 'auto' for one per CPU; "
        "health checks, registry and admin API run once, in a supervisor (default 1)",
    )  # fmt: skip
    logging_args(run)

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", required=True, help="config file")

    sim = sub.add_parser(
        "simulate", help="show how a policy would spread requests over an upstream's backends"
    )
    sim.add_argument("-c", "--config", required=True, help="config file")
    sim.add_argument(
        "--route", help="upstream to simulate (default: the only one, or the first route's)"
    )
    sim.add_argument("--requests", type=int, default=10000, help="requests (default 10000)")
    sim.add_argument(
        "--latency", action="append", default=[], metavar="BACKEND=MS",
        help="a backend's latency, e.g. 127.0.0.1:5002=50 (repeat; default 1 ms)",
    )  # fmt: skip
    sim.add_argument("--rate", type=float, default=1000.0, help="arrivals per second (1000)")

    st = sub.add_parser("status", help="show routes and backends of a running poise")
    st.add_argument(
        "--admin", default="127.0.0.1:9901",
        help="the admin API (the config's admin.listen): host:port or a URL "
        "(default 127.0.0.1:9901)",
    )  # fmt: skip
    st.add_argument(
        "--token",
        help="admin token: the config's admin.token, or the one poise logs at start when that is "
        "not set (default: $POISE_ADMIN_TOKEN)",
    )

    demo = sub.add_parser("demo", help="start 3 demo backends and a balancer in front of them")
    demo.add_argument(
        "--listen", default="127.0.0.1:8080", help="balancer address (default 127.0.0.1:8080)"
    )
    logging_args(demo)

    reg = sub.add_parser(
        "register",
        help="register a process in the registry and heartbeat for it "
        "(sidecar; needs poise[client])",
        usage="poise register --service NAME --port PORT [options] [-- command args...]",
    )  # fmt: skip
    reg.add_argument("--registry", default="http://127.0.0.1:8500", help="registry API URL")
    reg.add_argument("--service", required=True, help="service name")
    reg.add_argument("--port", required=True, type=int, help="the port the process serves on")
    reg.add_argument("--host", default="127.0.0.1", help="address to register (127.0.0.1)")
    reg.add_argument("--id", help="instance id (default: SERVICE-HOSTNAME-PORT)")
    reg.add_argument("--ttl", default="10s", help="heartbeat TTL (default 10s)")
    reg.add_argument("--token", help="bearer token (default: $POISE_REGISTRY_TOKEN)")
    reg.add_argument(
        "--health-url", help="heartbeat as passing only while this URL answers 2xx, else critical"
    )
    reg.add_argument("--interval", default="2s", help="health check interval (default 2s)")
    reg.add_argument(
        "command_args", metavar="command", nargs=argparse.REMAINDER,
        help="after --: a command to run; deregistered when it exits (optional)",
    )  # fmt: skip
    logging_args(reg)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "check":
            return _check(args.config)
        if args.command == "run":
            return _run(args, parser)
        if args.command == "simulate":
            return _simulate(args, parser)
        if args.command == "status":
            return _status(args)
        if args.command == "register":
            return _register(args, parser)
        if args.command == "demo":
            from poise.demo import demo

            return demo(args.listen, args.log_level or "info", args.log_format or "text")
    except ConfigError as exc:
        print(f"poise: {exc}", file=sys.stderr)
        return 1
    except RegistryError as exc:
        print(f"poise: registry: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover - parser.error exits


def _status(args: argparse.Namespace) -> int:
    import os

    from poise.admin.status import StatusError, status

    token = args.token or os.environ.get("POISE_ADMIN_TOKEN", "")
    try:
        print(status(args.admin, token), end="")
    except StatusError as exc:
        print(f"poise status: {exc}", file=sys.stderr)
        return 1
    return 0


def _check(path: str) -> int:
    from poise.config import load_config
    from poise.errors import ConfigError
    from poise.registry.sources import FileSource, SourceError

    config = load_config(path)
    n = sum(len(u.backends) for u in config.upstreams.values())
    problems = []
    for name, ucfg in config.upstreams.items():
        if ucfg.file is not None:  # read as `poise run` reads it: a bad one stops the start
            try:
                n += len(FileSource(ucfg.file).read())
            except SourceError as exc:
                problems.append(f"upstreams.{name}.file: {exc}")
    if problems:
        raise ConfigError(problems, config.source)
    print(
        f"{path}: OK ({len(config.listeners)} listener(s), {len(config.upstreams)} upstream(s), "
        f"{n} backend(s))"
    )
    for warning in config.warnings:
        print(f"poise: warning: {warning}", file=sys.stderr)
    return 0


def _simulate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from poise.config import load_config
    from poise.simulate import UnknownBackend, render, simulate

    config = load_config(args.config)
    name = args.route or (
        next(iter(config.upstreams)) if len(config.upstreams) == 1
        else _first_upstream(config.listeners[0])
    )  # fmt: skip
    if name not in config.upstreams:
        parser.error(f"no upstream {name!r} (have: {', '.join(config.upstreams)})")
    latency: dict[str, float] = {}
    for item in args.latency:
        backend, sep, ms = item.rpartition("=")
        try:
            latency[backend.removeprefix("http://")] = float(ms)
        except ValueError:
            sep = ""
        if not sep or not backend:
            parser.error(f"--latency takes BACKEND=MS, got {item!r}")
    if args.requests <= 0 or args.rate <= 0:
        parser.error("--requests and --rate must be above 0")
    policy = config.upstreams[name].policy
    try:
        shares = simulate(config, name, args.requests, latency, rate=args.rate)
    except UnknownBackend as exc:
        parser.error(f"--latency: {exc}")
    print(f"upstream {name}: policy {policy.name}, {args.requests} requests at {args.rate:g}/s")
    print(render(shares))
    return 0


def usable_cpus() -> int:
    """The CPUs this process may run on (``--workers auto``): its affinity mask where the
    system has one (Linux), else every CPU (macOS has no sched_getaffinity)."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import logging

    from poise.config import load_config, parse_config
    from poise.logs import setup_logging
    from poise.server import run

    if args.workers == "auto":
        workers = usable_cpus()
    elif args.workers.isdigit() and 1 <= int(args.workers) <= 256:
        workers = int(args.workers)
    else:
        parser.error(f"--workers: expected a number from 1 to 256 or 'auto', got {args.workers!r}")
    if args.config:
        if args.listen or args.backend:
            parser.error("use either -c FILE or --listen/--backend, not both")
        config = load_config(args.config)
    else:
        if not args.backend:
            parser.error("give -c FILE, or at least one --backend URL")
        config = parse_config(
            {
                "port": args.listen or ":8080",
                "healthCheckInterval": args.health_interval,
                "servers": args.backend,
            },
            source="command line",
        )
    setup_logging(args.log_level or config.log.level, args.log_format or config.log.format)
    logging.getLogger("poise").info("poise %s, hot path: %s", __version__, build())
    try:
        if workers > 1:
            from poise.workers import run as run_workers

            return run_workers(config, workers, watch_config=args.watch_config)
        return run(config, watch_config=args.watch_config)
    except RuntimeError as exc:  # workers that would not start
        print(f"poise: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # e.g. the port is taken: say so plainly rather than with a traceback
        print(f"poise: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        asyncio.set_event_loop_policy(None)


def _register(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import os

    from poise.config import parse_duration
    from poise.errors import PoiseError
    from poise.logs import setup_logging

    try:
        from poise.client.sidecar import SidecarConfig, sidecar
    except ImportError as exc:
        print(f"poise: {exc}", file=sys.stderr)
        return 1
    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    try:
        ttl, interval = parse_duration(args.ttl), parse_duration(args.interval)
    except ValueError as exc:
        parser.error(f"--ttl/--interval: {exc}")
    if interval <= 0:
        parser.error("--interval must be above 0")
    if args.health_url and not args.health_url.startswith(("http://", "https://")):
        parser.error(f"--health-url: expected an http:// or https:// URL, got {args.health_url!r}")
    cfg = SidecarConfig(
        registry=args.registry, service=args.service, port=args.port, host=args.host,
        id=args.id, ttl=ttl, token=args.token or os.environ.get("POISE_REGISTRY_TOKEN"),
        health_url=args.health_url, interval=interval, command=tuple(command),
    )  # fmt: skip
    setup_logging(args.log_level or "info", args.log_format or "text")
    try:
        return sidecar(cfg)
    except (PoiseError, OSError) as exc:
        print(f"poise register: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def _first_upstream(listener: ListenerConfig) -> str:
    return listener.tcp.upstream if listener.tcp is not None else listener.routes[0].upstream
