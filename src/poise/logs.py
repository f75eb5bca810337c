"""Logging set-up for the CLI: human-readable text by default, or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class _Worker(logging.Filter):
    """Marks a worker process's records (``--workers N``): JSON gets ``"worker": n``."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


# libraries that log a line per call at INFO (httpx: "HTTP Request: POST http://etcd/...",
# ~5 per etcd registration, 2 per heartbeat): their INFO and below is poise's DEBUG
LIBRARIES = ("httpx", "httpcore")


class _LibraryChatter(logging.Filter):
    """Passes a library's INFO record only when ``root`` is at DEBUG, relabelled DEBUG."""

    def __init__(self, root: logging.Logger) -> None:
        super().__init__()
        self.root = root

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or record.name.split(".", 1)[0] not in LIBRARIES:
            return True
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.root.isEnabledFor(logging.DEBUG)


def setup_logging(level: str = "info", fmt: str = "text", *, worker: int | None = None) -> None:
    """Log to stderr; ``worker``: this is worker process n of ``--workers N``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        who = "%(name)s" if worker is None else f"%(name)s[worker {worker}]"
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {who}: %(message)s", "%H:%M:%S")
        )
    if worker is not None:
        handler.addFilter(_Worker(worker))
    root = logging.getLogger()
    handler.addFilter(_LibraryChatter(root))
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
