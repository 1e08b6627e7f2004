"""The local Hub's download meter: bytes of file content served, and an optional bandwidth limit.

The limit stands for a slow link between a user and the Hub (for benchmarks): every connection
queues on the same budget, so two downloads at once each get half of it.
"""

from __future__ import annotations

import threading
import time


class Meter:
    """Bytes of file content served, and an optional bandwidth limit shared by every connection."""

    def __init__(self, bytes_per_s: float | None = None):
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("bandwidth must be a positive number of bytes per second")
        self.bytes_per_s = bytes_per_s
        self.bytes_served = 0
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the link is next free, on the monotonic clock

    def wait_for(self, count: int) -> None:
        """Block until ``count`` more bytes fit in the limit (a queue: connections share the link)."""
        if not self.bytes_per_s:
            return
        with self._lock:
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + count / self.bytes_per_s
            delay = self._free_at - now  # the bytes go when the link would have carried them
        if delay > 0:
            time.sleep(delay)

    def count(self, count: int) -> None:
        """Record ``count`` bytes sent."""
        with self._lock:
            self.bytes_served += count
