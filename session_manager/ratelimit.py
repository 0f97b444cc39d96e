"""A token bucket that limits bytes per second: remotes' bandwidth limit and a live migration's disk copy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    """A token bucket: on average at most ``rate`` bytes a second, in bursts of up to ``burst`` bytes.

    take(n) may run the bucket into debt (an object larger than the burst) and returns how long
    to wait before sending, which pays the debt off; so an object goes out after the time its
    size takes at ``rate``.  Shared between threads.
    """

    def __init__(self, rate: int, burst: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("the rate must be positive")
        self.rate = rate
        self.burst = rate if burst is None else burst
        self._clock = clock
        self._tokens = float(self.burst)
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> float:
        """Take ``n`` tokens; returns the seconds to wait before sending them."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate) - n
            self._last = now
            return max(0.0, -self._tokens / self.rate)
