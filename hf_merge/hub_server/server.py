"""A local, Hub-compatible HTTP server for the real ``huggingface_hub`` client and ``transformers``.

It serves what those clients call (see the endpoint list in :class:`HubRequestHandler`): creating
repos, commits with regular and Git LFS files, branches, pull requests, downloads with the Hub's
headers, repo info, tree listings and model search. Data lives on disk under ``root``
(:mod:`hf_merge.hub_server.storage`), so a restarted server serves everything it stored before.

Clients must set ``HF_ENDPOINT=<server url>`` before importing ``huggingface_hub`` (or pass
``endpoint=`` to ``HfApi``) and ``HF_HUB_DISABLE_XET=1``: the server speaks plain Git LFS, never Xet.

Example:
    >>> with LocalHubServer("hub-data", tokens={"alice": "secret"}) as hub:
    ...     HfApi(endpoint=hub.url, token="secret").create_repo("alice/demo")
"""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hf_merge.hub_server.handler import HubRequestHandler
from hf_merge.hub_server.limits import HeaderDeadlines, HubLimits
from hf_merge.hub_server.routes import HubApi
from hf_merge.hub_server.throttle import Meter
from hf_merge.log import get_logger

__all__ = ["HubRequestHandler", "LocalHubServer", "serve"]

logger = get_logger(__name__)

_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"


class HubHTTPServer(ThreadingHTTPServer):
    """The HTTP server of :class:`LocalHubServer`: the API, the byte meter and the limits its handlers read."""

    daemon_threads = True
    request_queue_size = 128  # many client threads open connections at once

    def __init__(self, address: tuple[str, int], api: HubApi, meter: Meter, limits: HubLimits):
        self.api = api
        self.meter = meter
        self.limits = limits
        self.deadlines = HeaderDeadlines(limits.header_timeout_s)
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        super().__init__(address, HubRequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per connection, but never more than max_connections of them.
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_close(self) -> None:
        self.deadlines.stop()
        super().server_close()


class LocalHubServer:
    """A Hub-compatible server over a folder, running in a background thread.

    Args:
        root: Folder holding every repo (created if missing; reused as is after a restart).
        host: Interface to listen on. Keep ``127.0.0.1`` unless other machines must reach it.
        port: TCP port; ``0`` picks a free one (see :attr:`url`).
        tokens: User name -> secret. A request authenticates with ``Authorization: Bearer <secret>``.
        bandwidth_bytes_per_s: Limit on the file bytes sent per second, over all connections
            together (a slow link, for benchmarks); ``None`` for no limit.
        orgs: Organization name -> its members (users of ``tokens``), who own its repos.
        limits: Body caps, timeouts and the connection limit (:class:`~hf_merge.hub_server.limits.HubLimits`).
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, tokens: dict[str, str] | None = None,
                 bandwidth_bytes_per_s: float | None = None, orgs: dict[str, list[str]] | None = None,
                 limits: HubLimits | None = None):
        self.root = Path(root)
        self.host = host
        self.limits = limits or HubLimits()
        self.api = HubApi(self.root, tokens or {}, orgs)
        self._meter = Meter(bandwidth_bytes_per_s)
        self._httpd = HubHTTPServer((host, port), self.api, self._meter, self.limits)
        self.port = int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def bytes_served(self) -> int:
        """Bytes of file content sent by downloads (``resolve``) since the server started."""
        return self._meter.bytes_served

    @property
    def bandwidth_bytes_per_s(self) -> float | None:
        """The bandwidth limit, or ``None``; settable while serving."""
        return self._meter.bytes_per_s

    @bandwidth_bytes_per_s.setter
    def bandwidth_bytes_per_s(self, value: float | None) -> None:
        if value is not None and value <= 0:
            raise ValueError("bandwidth must be a positive number of bytes per second")
        self._meter.bytes_per_s = value

    @property
    def url(self) -> str:
        """Base URL to use as ``HF_ENDPOINT`` or ``HfApi(endpoint=...)``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalHubServer:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="local-hub", daemon=True
            )
            self._thread.start()
            logger.info("Local Hub serving %s at %s", self.root, self.url)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        logger.info("Local Hub serving %s at %s", self.root, self.url)
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        """Stop serving and free the port; stored data stays on disk."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 8000, tokens: dict[str, str] | None = None,
          bandwidth_bytes_per_s: float | None = None) -> None:
    """Run a local Hub in the foreground (what ``hf-merge hub serve`` does); returns on Ctrl-C."""
    server = LocalHubServer(root, host=host, port=port, tokens=tokens, bandwidth_bytes_per_s=bandwidth_bytes_per_s)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
