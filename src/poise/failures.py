"""The one table of how a proxied request fails: what the client gets, what is counted, when
another backend may be tried and what passive health is told.

Two kinds of entry:

* an ``Answer``: an error poise answers a request with itself. Each answered request counts
  once, under the one reason it was answered for (``Stats`` field ``counter``), exported as
  ``poise_errors_total{kind, status}``;
* an ``AttemptFailure``: one attempt at a backend that failed, retried or not (``Stats``
  field ``counter``, exported as ``poise_upstream_attempt_failures_total{outcome}``). Another
  backend may take the request when ``retry_on`` is listed in the upstream's ``retry.on``
  (and the request is safe to repeat: l7/retry.py); passive health records ``passive`` as
  the backend's failure reason (a failed connect records the error's own reason, from
  netreasons.py); when no other try is made the client gets ``answer``.

::

    attempt failure   retry.on   passive reason      answer when not retried
    connect_error     connect    (the error's own)   502 Bad Gateway (503 when every
                                                     attempt was refused or timed out)
    timeout           timeout    timeout             504 Gateway Timeout
    reset             reset      reset               502 Bad Gateway
    broken            -          broken              502 Bad Gateway (or the connection
                                                     is cut, once the response has begun)

Bad requests (400, 413, 414, 431, 501, 505) are the parser's and counted by status
(``Stats.rejects``); the registry's errors carry their HTTP status by type (errors.py).
Pure data: imported by the L7 proxy, the L4 relay and the metrics exposition alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Answer:
    """An error response poise sends itself."""

    kind: str  # the ``kind`` label of poise_errors_total
    status: int
    message: str
    counter: str  # the Stats field counting it


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    """An attempt at a backend that failed."""

    outcome: str  # the ``outcome`` label of poise_upstream_attempt_failures_total
    counter: str  # the Stats field counting it
    retry_on: str  # the retry.on condition under which another backend may take it; "": none
    passive: str  # the reason passive health records for the backend ("": the error's own)
    answer: Answer  # what the client gets when no other try is made


NO_ROUTE: Final = Answer("no_route", 404, "Not Found", "no_route")
CLIENT_TIMEOUT: Final = Answer("client_timeout", 408, "Request Timeout", "client_408")
UPSTREAM_ERROR: Final = Answer("upstream_error", 502, "Bad Gateway", "upstream_errors")
NO_HEALTHY_BACKEND: Final = Answer(
    "no_healthy_backend", 503, "No healthy server available", "no_healthy_backend"
)
QUEUE_FULL: Final = Answer(
    "queue_full", 503, "Upstream busy: too many requests waiting", "queue_full"
)
QUEUE_TIMEOUT: Final = Answer(
    "queue_timeout",
    503,
    "Upstream busy: no backend free within the queue timeout",
    "queue_timeouts",
)
CONNECTIONS_REFUSED: Final = Answer(
    "connection_refused", 503, "Too many connections", "connections_refused"
)
UPSTREAM_TIMEOUT: Final = Answer("upstream_timeout", 504, "Gateway Timeout", "upstream_timeouts")
ANSWERS: Final = (
    NO_ROUTE,
    CLIENT_TIMEOUT,
    UPSTREAM_ERROR,
    NO_HEALTHY_BACKEND,
    QUEUE_FULL,
    QUEUE_TIMEOUT,
    CONNECTIONS_REFUSED,
    UPSTREAM_TIMEOUT,
)

CONNECT: Final = AttemptFailure(
    "connect_error", "upstream_connect_errors", "connect", "", UPSTREAM_ERROR
)
TIMEOUT: Final = AttemptFailure(
    "timeout", "attempt_timeouts", "timeout", "timeout", UPSTREAM_TIMEOUT
)
RESET: Final = AttemptFailure("reset", "attempt_resets", "reset", "reset", UPSTREAM_ERROR)
BROKEN: Final = AttemptFailure("broken", "attempt_broken", "", "broken", UPSTREAM_ERROR)
ATTEMPT_FAILURES: Final = (CONNECT, TIMEOUT, RESET, BROKEN)
