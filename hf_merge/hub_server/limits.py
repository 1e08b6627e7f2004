"""What one client may cost the local Hub: body sizes, time per connection, connections at once.

The server authenticates and routes on the request line and headers alone; a body is read only
for a route that takes one, by a client allowed to call it, and never past the route's cap. A
refused request's body is left unread and its connection closed.

- JSON bodies (repo creation, preupload, LFS batch, paths-info, webhooks, settings): 8 MiB.
- Commit payloads (``application/x-ndjson``, regular files inline in base64): 64 MiB; larger
  files go through LFS, as the client does by itself from 10 MB.
- LFS uploads: streamed to disk, exactly the size the batch request announced, checked against
  its sha256; a ``Content-Length`` that differs from it is refused before a byte is read.
- A connection has 30 s to send a request line and its headers (slow or idle clients are
  disconnected), and 5 s between two keep-alive requests; each read or write of a body then
  waits at most 60 s. A client that sends ``Expect: 100-continue`` gets the ``100`` only from a
  route that reads its body.
- At most 256 connections are served at once; beyond that a connection is answered ``503``
  with ``Retry-After`` and closed, so the thread count stays bounded.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class HubLimits:
    """The local Hub's limits (the defaults are what ``hf-merge hub serve`` uses)."""

    json_body_bytes: int = 8 * MiB
    commit_body_bytes: int = 64 * MiB
    header_timeout_s: float = 30.0
    keepalive_timeout_s: float = 5.0
    io_timeout_s: float = 60.0
    max_connections: int = 256

    def __post_init__(self) -> None:
        for name in ("json_body_bytes", "commit_body_bytes", "header_timeout_s", "keepalive_timeout_s", "io_timeout_s",
                     "max_connections"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HubLimits.{name} must be positive")


class HeaderDeadlines:
    """Disconnects connections that have not sent a whole request head in time (one thread for all).

    A per-read socket timeout alone lets a client that sends one byte every few seconds hold a
    thread forever; a deadline for the whole head does not.
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def arm(self, connection: socket.socket, timeout_s: float | None = None) -> None:
        """Start the clock: the next request head must arrive within ``timeout_s`` (default: the timeout)."""
        with self._lock:
            self._deadlines[connection] = time.monotonic() + (timeout_s or self.timeout_s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="local-hub-deadlines", daemon=True)
                self._thread.start()

    def disarm(self, connection: socket.socket) -> bool:
        """Stop the clock; ``False`` if the deadline had already passed (the connection is cut)."""
        with self._lock:
            return self._deadlines.pop(connection, None) is not None

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        tick = min(0.5, self.timeout_s / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                late = [conn for conn, deadline in self._deadlines.items() if deadline <= now]
                for conn in late:
                    del self._deadlines[conn]
            for conn in late:
                try:
                    # Wakes the handler's blocked read with end-of-file; it then closes the connection.
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
