"""Per-backend load facts a policy may read: requests in flight and peak-EWMA latency.

Owned per upstream group by the proxy, which reports ``started``/``finished``; the policies
only read. Pure: the clock reading comes in as an argument.

Peak EWMA (Finagle's, as used by Linkerd): a sample above the current estimate replaces it
at once (a backend that slows down is noticed on its first slow answer); a lower one pulls
it down with weight ``1 - exp(-dt/tau)``. Read back, the estimate decays towards zero with
the time since the last sample, so a backend that was slow and then left alone is tried
again rather than starved. Failures count as ``FAILURE_PENALTY`` seconds: a backend that
fails fast must not look fast.
"""

from __future__ import annotations

import math

TAU = 10.0  # seconds
FAILURE_PENALTY = 1.0  # seconds of latency charged for a failed request


class Load:
    __slots__ = ("active", "ewma", "latency", "stamp")

    def __init__(self, n: int, *, latency: bool = True) -> None:
        self.active = [0] * n
        self.ewma = [0.0] * n
        self.stamp = [0.0] * n
        # whether anyone reads latency: if not, the proxy does not time requests for it
        self.latency = latency

    def started(self, i: int) -> None:
        self.active[i] += 1

    def finished(self, i: int, latency: float, ok: bool, now: float) -> None:
        if self.active[i] > 0:
            self.active[i] -= 1
        sample = latency if ok else max(latency, FAILURE_PENALTY)
        current = self.cost_latency(i, now)
        if sample > current:
            self.ewma[i] = sample
        else:
            w = math.exp(-max(now - self.stamp[i], 0.0) / TAU)
            self.ewma[i] = current * w + sample * (1.0 - w)
        self.stamp[i] = now

    def cost_latency(self, i: int, now: float) -> float:
        """The latency estimate, decayed by the time since the last sample."""
        e = self.ewma[i]
        if e == 0.0:
            return 0.0
        return e * math.exp(-max(now - self.stamp[i], 0.0) / TAU)

    def __repr__(self) -> str:
        return f"Load(active={self.active})"
