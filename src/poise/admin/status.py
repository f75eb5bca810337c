"""``poise status``: a table of routes and backends, read from a running poise's admin API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class StatusError(Exception):
    pass


def admin_url(admin: str) -> str:
    """The admin API's base URL from ``--admin``: a URL, ``host:port`` or ``:port``.

    ``host:port`` means ``http://host:port`` (the admin listener speaks plain HTTP) and
    ``:port`` means ``http://127.0.0.1:port``, as ``admin.listen`` is written in the config.
    """
    admin = admin.strip()
    if "://" in admin:
        if not admin.startswith(("http://", "https://")):
            raise StatusError(f"--admin: expected host:port or an http:// URL, got {admin!r}")
        return admin
    if not admin or "/" in admin:
        raise StatusError(f"--admin: expected host:port or an http:// URL, got {admin!r}")
    return "http://" + ("127.0.0.1" + admin if admin.startswith(":") else admin)


def fetch(admin: str, token: str, path: str) -> Any:
    request = urllib.request.Request(
        admin.rstrip("/") + path, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise StatusError(
                "the admin API refused the token (give --token or set POISE_ADMIN_TOKEN: the "
                "config's admin.token, or the one poise logged at start when that is not set)"
            ) from exc
        raise StatusError(f"{path}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach the admin API at {admin}: {reason}") from exc


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def state_of(b: dict[str, Any]) -> tuple[str, str]:
    check = b.get("check") or {}
    if b.get("state", "enabled") != "enabled":
        return b["state"], ""
    if b.get("ejected"):
        return "ejected", str(b.get("reason", ""))
    if b.get("reported") is False:
        return "critical", "registry"
    if b.get("up"):
        return "up", ""
    return "down", str(check.get("reason", ""))


def render(status: dict[str, Any], routes: dict[str, Any], upstreams: dict[str, Any]) -> str:
    workers = status.get("workers")  # with --workers N
    serving = "" if workers is None else (
        f", {sum(1 for w in workers if w['state'] == 'serving')}/{len(workers)} workers serving"
    )  # fmt: skip
    out = [
        f"poise {status['version']}, up {status['uptime_s']:.0f} s, "
        f"{status['requests']} requests, {status['clients']} clients{serving}"
    ]
    rows = [["LISTENER", "HOST", "PATH", "UPSTREAM"]]
    for listener, rs in routes.items():
        rows += [[listener, ",".join(r["hosts"]) or "*", r["path"], r["upstream"]] for r in rs]
    out += ["", _table(rows)]
    rows = [["UPSTREAM", "BACKEND", "STATE", "WHY", "WEIGHT", "IN FLIGHT", "2XX", "5XX"]]
    for name, info in upstreams.items():
        for b in info["backends"]:
            state, why = state_of(b)
            inflight = "-" if b.get("in_flight") is None else str(b["in_flight"])
            rows.append(
                [
                    name,
                    b["url"],
                    state,
                    why,
                    str(b["weight"]),
                    inflight,
                    str(b["responses"]["2xx"]),
                    str(b["responses"]["5xx"]),
                ]
            )
        if not info["backends"]:
            rows.append([name, "(no backends)", "", "", "", "", "", ""])
    out += ["", _table(rows)]
    return "\n".join(out) + "\n"


def status(admin: str, token: str) -> str:
    admin = admin_url(admin)
    return render(
        fetch(admin, token, "/v1/status"),
        fetch(admin, token, "/v1/routes"),
        fetch(admin, token, "/v1/upstreams"),
    )
