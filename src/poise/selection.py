"""Backend selection and the load lease, one for the HTTP proxy (L7) and the TCP relay (L4).

``select`` walks the group's policy candidates (``Picker.candidates(key, up)``) and takes
the first one that is usable now:

* up in the group's view, or (L7) draining but pinned to this request by its sticky cookie;
* not tried yet for this request or connection;
* not at a limit of ``upstream.limits`` (the group's or the backend's share);
* under slow start, a ramping backend is passed over with probability 1 - ramp, and taken
  if nothing else is left.

In panic mode (``group.healthy`` set: too few healthy backends, so the unhealthy ones are
in the view too) a retry goes to a backend healthy in its own right first, while one is
left untried.

The lease: a chosen backend counts in its group's load (``Load.active``, which least_conn,
p2c and peak EWMA read) and request limits (``Admission``) from ``take`` until ``release``,
which also folds the attempt's latency and outcome into peak EWMA. The caller keeps the
``Load`` and ``Admission`` it took from: membership may change meanwhile, and the release
must go to the figures the take went to. The L7 dispatch inlines ``take`` for the common
case (tests/l7/test_shortcuts.py checks it against this one).

Pure: no I/O, no clock but what the caller passes (``rand``, ``now``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from poise.balancing.load import Load
    from poise.models import Backend
    from poise.routing import Group
    from poise.upstream.limits import Admission


def select(
    group: Group,
    key: bytes | None,
    tried: tuple[Backend, ...],
    rand: Callable[[], float],
    *,
    pin: bool = False,
) -> tuple[Backend | None, bool]:
    """The backend of ``group`` for a request (``key``: its hash or sticky key) that has
    tried ``tried``: (the backend or None, whether one was passed over for a request limit,
    so a caller may queue instead of giving up). ``pin``: a sticky cookie may pin the
    request to a draining backend (L7)."""
    up = group.up
    healthy = group.healthy
    if tried and healthy is not None and any_untried(group, healthy, tried):
        up = healthy  # a retry in panic mode: a backend usable in its own right first
    sticky = group.sticky if pin else None
    sticky_ok, ramp, adm, load = group.sticky_ok, group.ramp, group.admission, group.load
    skipped: Backend | None = None  # a slow-starting backend passed over by chance
    limited = False
    first = True
    for backend in group.picker.candidates(key, up):
        i = backend.index
        pinned = first and sticky is not None and sticky_ok is not None
        first = False
        if backend in tried:
            continue
        # a draining backend still serves the clients its sticky cookie pins to it
        if not up[i] and not (
            pinned and sticky_ok[i] and sticky.values[i] == key  # type: ignore[index,union-attr]
        ):
            continue
        if (
            adm is not None
            and load is not None
            and (adm.group_full() or adm.backend_full(load.active[i]))
        ):
            limited = True
            continue
        if ramp is not None and ramp[i] < 1.0 and rand() >= ramp[i]:
            skipped = skipped or backend
            continue
        return backend, False
    return skipped, limited and skipped is None


def any_untried(group: Group, usable: tuple[bool, ...], tried: tuple[Backend, ...]) -> bool:
    """Whether a backend of ``group`` usable in ``usable`` is not in ``tried``."""
    return any(usable[b.index] and b not in tried for b in group.backends)


def take(group: Group, backend: Backend) -> tuple[Load | None, Admission | None]:
    """Count a request or connection in ``backend``'s load and its group's request limits;
    returns what to ``release`` it from."""
    load, adm = group.load, group.admission
    if load is not None:
        load.active[backend.index] += 1
        if adm is not None:
            adm.active += 1
    return load, adm


def release(
    load: Load | None,
    adm: Admission | None,
    index: int,
    *,
    ok: bool,
    latency: float,
    now: float,
) -> None:
    """The end of a lease taken by ``take`` (or the L7 dispatch's inline copy) on the backend
    at ``index``: out of the load, with the attempt's ``latency`` and outcome for peak EWMA,
    and its request-limit slot freed for the oldest waiter."""
    if load is None:
        return
    if load.latency:
        load.finished(index, latency, ok, now)
    elif load.active[index] > 0:
        load.active[index] -= 1
    if adm is not None:
        adm.released()
