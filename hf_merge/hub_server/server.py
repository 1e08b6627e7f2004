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

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from hf_merge.log import get_logger
from hf_merge.hub_server.request import Request, parse_range
from hf_merge.hub_server.routes import HubApi
from hf_merge.hub_server.throttle import Meter
from hf_merge.hub_server.git import HubError

logger = get_logger(__name__)

_CHUNK = 1 << 20
_THROTTLED_CHUNK = 64 << 10  # small steps keep a throttled rate smooth
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


class HubRequestHandler(BaseHTTPRequestHandler):
    """Parses requests, routes them to :class:`HubApi` and writes the Hub's headers back.

    Routes (``{t}`` is ``models``, ``datasets`` or ``spaces``; ``{p}`` is ``""``, ``datasets/`` or
    ``spaces/``):
    ``/api/whoami-v2``, ``/api/repos/{create,delete}``, ``/api/validate-yaml``, ``/api/{t}``,
    ``/api/{t}/{ns}/{name}[/revision/{rev}]``, ``…/preupload/{rev}``, ``…/commit/{rev}``,
    ``…/branch/{b}``, ``…/tag/{rev}``, ``…/tree/{rev}[/{path}]``, ``…/refs``, ``…/commits/{rev}``,
    ``…/paths-info/{rev}``, ``…/discussions[/{num}]``, ``…/settings``, ``/api/settings/webhooks[/{id}]``, ``/{p}{ns}/{name}.git/info/lfs/objects/batch``,
    ``/lfs-upload/{ticket}`` and ``/{p}{ns}/{name}/resolve/{rev}/{path}``.
    """

    protocol_version = "HTTP/1.1"
    server_version = "hf-merge-local-hub"
    server: "_HubHTTPServer"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        # Request lines only, at debug level: headers (tokens) are never logged.
        logger.debug("%s " + format, self.address_string(), *args)

    # ---- plumbing ------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        api = self.server.api
        self._body_consumed = False
        try:
            url = urlsplit(self.path)
            # Split before unquoting: revisions and tree paths arrive as one quoted segment.
            segments = [unquote(part) for part in url.path.split("/")[1:]]
            query = parse_qs(url.query)
            if method == "PUT" and len(segments) == 2 and segments[0] == "lfs-upload":
                api.lfs_upload(segments[1], self._iter_body())
                self._body_consumed = True
                return self._send_json(200, {})
            body = self._read_body()
            user = api.authenticate(self.headers.get("Authorization"))
            request = Request(method, segments, query, body, self.headers.get("Content-Type", ""), user, self._base())
            self._route(api, request)
        except HubError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nobody to answer
        except FileNotFoundError:
            # A repo deleted while this request was reading it.
            self._send_error(HubError(404, "Repository not found", code="RepoNotFound"))
        except Exception:  # a bug must not kill the connection thread silently
            logger.exception("Local Hub failed on %s %s", method, self.path)
            self._send_error(HubError(500, "Internal error of the local Hub server."))

    def _base(self) -> str:
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
        return f"http://{host}"

    def _iter_body(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                try:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                except ValueError as error:
                    raise HubError(400, "Malformed chunked request body.") from error
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, then the final empty line
                        pass
                    break
                yield from self._read_exactly(size)
                self.rfile.readline()
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))
        self._body_consumed = True

    def _read_exactly(self, remaining: int) -> Iterator[bytes]:
        while remaining:
            chunk = self.rfile.read(min(remaining, _CHUNK))
            if not chunk:
                raise HubError(400, "Request body ended early.")
            remaining -= len(chunk)
            yield chunk

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _send(self, status: int, body: bytes, headers: dict[str, str], content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        if not self._body_consumed:
            # Unread request bytes would be taken for the next request on this connection.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers or {}, "application/json; charset=utf-8")

    def _send_error(self, error: HubError) -> None:
        message = " ".join(error.message.split())
        headers = {"X-Error-Message": message.encode("latin-1", "replace").decode("latin-1"), **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send_json(error.status, {"error": message, **error.body}, headers)

    # ---- routing -------------------------------------------------------------------------------
    def _route(self, api: HubApi, req: "Request") -> None:
        seg, method = req.segments, req.method
        if seg[:1] == ["api"] and len(seg) >= 2:
            if seg[1:] == ["whoami-v2"] and method == "GET":
                return self._send_json(200, api.whoami(req.user))
            if seg[1:] == ["validate-yaml"] and method == "POST":
                status, data = api.validate_yaml(req.json())
                return self._send_json(status, data)
            if seg[1] == "repos" and seg[2:] == ["create"] and method == "POST":
                status, data = api.create_repo(req.user, req.json(), req.base)
                return self._send_json(status, data)
            if seg[1] == "repos" and seg[2:] == ["delete"] and method == "DELETE":
                return self._send_json(200, api.delete_repo(req.user, req.json()))
            if seg[1:3] == ["settings", "webhooks"]:
                status, data = api.webhooks.handle(req.user, method, seg[3:], req.json() if method == "POST" else {})
                return self._send_json(status, data)
            if seg[1] in _TYPES and len(seg) == 2 and method == "GET":
                return self._send_json(200, api.list_repos(req.user, _TYPES[seg[1]], req.query))
            if seg[1] in _TYPES and len(seg) >= 4:
                return self._route_repo_api(api, req, _TYPES[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:])
        repo_type, rest = "model", seg
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, rest = _TYPES[seg[0]], seg[1:]
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]:
            if method == "POST":
                data = api.lfs_batch(req.user, repo_type, f"{rest[0]}/{rest[1][:-4]}", req.json(), req.base)
                return self._send(200, json.dumps(data).encode(), {}, "application/vnd.git-lfs+json")
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(api, req, repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
        raise HubError(404, f"Not found: {method} {self.path.split('?')[0]}")

    def _route_repo_api(self, api: HubApi, req: "Request", repo_type: str, repo_id: str, rest: list[str]) -> None:
        method, user = req.method, req.user
        action, arg = (rest[0] if rest else ""), "/".join(rest[1:])
        if method == "GET" and action in ("", "revision"):
            return self._send_json(200, api.repo_info(user, repo_type, repo_id, arg or "main"))
        if method == "GET" and action == "tree":
            rev, path = (rest[1] if len(rest) > 1 else "main"), "/".join(rest[2:])
            data, commit_id = api.tree(user, repo_type, repo_id, rev, path, req.flag("recursive"))
            return self._send_json(200, data, {"X-Repo-Commit": commit_id})
        if method == "GET" and action == "discussions":
            page = int((req.query.get("p") or ["0"])[-1] or 0)
            return self._send_json(200, api.discussions(user, repo_type, repo_id, arg, page, req.base))
        if method == "GET" and action == "refs":
            return self._send_json(200, api.refs(user, repo_type, repo_id))
        if method == "GET" and action == "commits":
            return self._send_json(200, api.commits(user, repo_type, repo_id, arg or "main"))
        if method == "POST" and action == "paths-info":
            if "json" in req.content_type:
                paths = req.json().get("paths", [])
            else:
                paths = parse_qs(req.body.decode()).get("paths", [])
            return self._send_json(200, api.paths_info(user, repo_type, repo_id, arg or "main", paths))
        if method == "POST" and action == "preupload":
            return self._send_json(200, api.preupload(user, repo_type, repo_id, arg or "main", req.json()))
        if method == "POST" and action == "commit":
            data = api.commit(user, repo_type, repo_id, arg or "main", req.ndjson(), req.flag("create_pr"), req.base)
            return self._send_json(200, data)
        if action in ("branch", "tag") and method in ("POST", "DELETE") and arg:
            payload = req.json() if method == "POST" else {}
            return self._send_json(200, api.ref(user, method, repo_type, repo_id, action, arg, payload))
        if method == "PUT" and action == "settings":
            return self._send_json(200, api.settings(user, repo_type, repo_id, req.json()))
        raise HubError(404, f"Not found: {method} {self.path.split('?')[0]}")

    def _resolve(self, api: HubApi, req: "Request", repo_type: str, repo_id: str, rev: str, path: str) -> None:
        file, headers = api.resolve(req.user, repo_type, repo_id, rev, path)
        size = int(headers["Content-Length"])
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header:
            parsed = parse_range(range_header, size)
            if parsed is None:
                file.close()
                raise HubError(416, "Range not satisfiable.", headers={"Content-Range": f"bytes */{size}"})
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            headers["Content-Length"] = str(end - start + 1)
        with file:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if req.method == "HEAD":
                return
            file.seek(start)
            remaining = end - start + 1
            meter = self.server.meter
            chunk_size = _THROTTLED_CHUNK if meter.bytes_per_s else _CHUNK
            while remaining > 0:
                chunk = file.read(min(remaining, chunk_size))
                if not chunk:
                    break
                meter.wait_for(len(chunk))
                self.wfile.write(chunk)
                meter.count(len(chunk))
                remaining -= len(chunk)


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many client threads open connections at once

    def __init__(self, address: tuple[str, int], api: HubApi, meter: Meter):
        self.api = api
        self.meter = meter
        super().__init__(address, HubRequestHandler)


class LocalHubServer:
    """A Hub-compatible server over a folder, running in a background thread.

    Args:
        root: Folder holding every repo (created if missing; reused as is after a restart).
        host: Interface to listen on. Keep ``127.0.0.1`` unless other machines must reach it.
        port: TCP port; ``0`` picks a free one (see :attr:`url`).
        tokens: User name -> secret. A request authenticates with ``Authorization: Bearer <secret>``.
        bandwidth_bytes_per_s: Limit on the file bytes sent per second, over all connections
            together (a slow link, for benchmarks); ``None`` for no limit.
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, tokens: dict[str, str] | None = None,
                 bandwidth_bytes_per_s: float | None = None):
        self.root = Path(root)
        self.host = host
        self.api = HubApi(self.root, tokens or {})
        self._meter = Meter(bandwidth_bytes_per_s)
        self._httpd = _HubHTTPServer((host, port), self.api, self._meter)
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

    def start(self) -> "LocalHubServer":
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

    def __enter__(self) -> "LocalHubServer":
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
