"""The local Hub's HTTP layer: one connection's requests parsed, routed to :class:`HubApi`, answered.

The caller is authenticated and the route chosen from the request head alone; a body is read
only by a route that takes one, after its access check, up to the caps of
:mod:`~hf_merge.hub_server.limits`. A request answered without reading its body closes its
connection. Downloads stream the file with ``Range`` support and the bandwidth meter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from hf_merge.hub_server.git import HubError
from hf_merge.hub_server.objects import no_space_error
from hf_merge.hub_server.request import Request, parse_range
from hf_merge.hub_server.routes import HubApi
from hf_merge.log import get_logger

if TYPE_CHECKING:
    from hf_merge.hub_server.server import HubHTTPServer

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
    ``…/paths-info/{rev}``, ``…/discussions[/{num}]``, ``…/settings``, ``/api/settings/webhooks[/{id}]``,
    ``/{p}{ns}/{name}.git/info/lfs/objects/batch``,
    ``/lfs-upload/{ticket}`` and ``/{p}{ns}/{name}/resolve/{rev}/{path}``;
    ``POST …/discussions/{num}/merge|status``.
    """

    protocol_version = "HTTP/1.1"
    server_version = "hf-merge-local-hub"
    server: HubHTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.limits.io_timeout_s)
        self._requests = 0

    def handle_one_request(self) -> None:
        # The clock runs while waiting for a request head; between keep-alive requests it is shorter,
        # so idle pooled connections give their slot back soon.
        limits = self.server.limits
        timeout = limits.header_timeout_s if self._requests == 0 else min(limits.keepalive_timeout_s, limits.header_timeout_s)
        self._requests += 1
        self._expect_continue = False
        self.server.deadlines.arm(self.connection, timeout)
        try:
            super().handle_one_request()
        finally:
            self.server.deadlines.disarm(self.connection)

    def handle_expect_100(self) -> bool:
        # "100 Continue" only once a route decides to read the body (see _iter_body): a request
        # refused on its head gets its final answer before the client sends the body.
        self._expect_continue = True
        return True

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        if not self.server.deadlines.disarm(self.connection):
            # Cut off by the deadline: what was read is a truncated head, not a request.
            self.close_connection = True
            return False
        return parsed  # the head is in: bodies have their own (per read) timeout

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

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines only, at debug level: headers (tokens) are never logged.
        logger.debug("%s " + format, self.address_string(), *args)

    # ---- plumbing ------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        api = self.server.api
        # A request without a body leaves nothing unread: its connection may serve the next one.
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        self._body_consumed = not chunked and self.headers.get("Content-Length", "0").strip() in ("", "0")
        try:
            url = urlsplit(self.path)
            # Split before unquoting: revisions and tree paths arrive as one quoted segment.
            segments = [unquote(part) for part in url.path.split("/")[1:]]
            query = parse_qs(url.query)
            if method == "PUT" and len(segments) == 2 and segments[0] == "lfs-upload":
                length = self.headers.get("Content-Length")
                api.lfs.upload(segments[1], self._iter_body(None), int(length) if length and length.isdigit() else None)
                return self._send_json(200, {})
            user = api.authenticate(self.headers.get("Authorization"))
            limits = self.server.limits
            request = Request(method, segments, query, self.headers.get("Content-Type", ""), user, self._base(),
                              self._read_body, limits.json_body_bytes, limits.commit_body_bytes)
            self._route(api, request)
        except HubError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away or stalled; nobody to answer
        except FileNotFoundError:
            # A repo deleted while this request was reading it.
            self._send_error(HubError(404, "Repository not found", code="RepoNotFound"))
        except Exception as error:  # a bug must not kill the connection thread silently
            full = no_space_error(error)
            if full is not None:
                logger.warning("Local Hub: disk full on %s %s", method, self.path.split("?")[0])
                return self._send_error(full)
            logger.exception("Local Hub failed on %s %s", method, self.path)
            self._send_error(HubError(500, "Internal error of the local Hub server."))

    def _base(self) -> str:
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
        return f"http://{host}"

    def _iter_body(self, limit: int | None) -> Iterator[bytes]:
        """The body in chunks; past ``limit`` bytes (checked on ``Content-Length`` before any
        read, and as chunks arrive) a 413, the rest left unread."""
        too_large = HubError(413, f"Request body is larger than this endpoint's limit of {limit} bytes.")
        if self._expect_continue:
            self._expect_continue = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            received = 0
            while True:
                try:
                    size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                except ValueError as error:
                    raise HubError(400, "Malformed chunked request body.") from error
                if size == 0:
                    while self.rfile.readline(65537).strip():  # trailers, then the final empty line
                        pass
                    break
                received += size
                if limit is not None and received > limit:
                    raise too_large
                yield from self._read_exactly(size)
                self.rfile.readline()
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError as error:
                raise HubError(400, "Content-Length is not a number.") from error
            if length < 0 or (limit is not None and length > limit):
                raise too_large
            yield from self._read_exactly(length)
        self._body_consumed = True

    def _read_exactly(self, remaining: int) -> Iterator[bytes]:
        while remaining:
            chunk = self.rfile.read(min(remaining, _CHUNK))
            if not chunk:
                raise HubError(400, "Request body ended early.")
            remaining -= len(chunk)
            yield chunk

    def _read_body(self, limit: int) -> bytes:
        if self._body_consumed:
            return b""  # a request without a body
        return b"".join(self._iter_body(limit))

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
    def _route(self, api: HubApi, req: Request) -> None:
        seg, method = req.segments, req.method
        if seg[:1] == ["api"] and len(seg) >= 2:
            if seg[1:] == ["whoami-v2"] and method == "GET":
                return self._send_json(200, api.whoami(req.user))
            if seg[1:] == ["validate-yaml"] and method == "POST":
                status, data = api.validate_yaml(req.json())
                return self._send_json(status, data)
            if seg[1] == "repos" and seg[2:] == ["create"] and method == "POST":
                status, data = api.create_repo(_signed_in(req, "create a repository"), req.json(), req.base)
                return self._send_json(status, data)
            if seg[1] == "repos" and seg[2:] == ["delete"] and method == "DELETE":
                return self._send_json(200, api.delete_repo(_signed_in(req, "delete a repository"), req.json()))
            if seg[1:3] == ["settings", "webhooks"]:
                user = _signed_in(req, "manage webhooks")
                status, data = api.webhooks.handle(user, method, seg[3:], req.json() if method == "POST" else {})
                return self._send_json(status, data)
            if seg[1] in _TYPES and len(seg) == 2 and method == "GET":
                return self._send_json(200, api.list_repos(req.user, _TYPES[seg[1]], req.query))
            if seg[1] in _TYPES and len(seg) >= 4:
                return self._route_repo_api(api, req, _TYPES[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:])
        repo_type, rest = "model", seg
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, rest = _TYPES[seg[0]], seg[1:]
        if method == "POST" and len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]:
            repo_id = f"{rest[0]}/{rest[1][:-4]}"
            api.access.contributor(req.user, repo_type, repo_id)  # before the body is read
            data = api.lfs.batch(req.user, repo_type, repo_id, req.json(), req.base)
            return self._send(200, json.dumps(data).encode(), {}, "application/vnd.git-lfs+json")
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(api, req, repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
        raise HubError(404, f"Not found: {method} {self.path.split('?')[0]}")

    def _route_repo_api(self, api: HubApi, req: Request, repo_type: str, repo_id: str, rest: list[str]) -> None:
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
            api.access.readable(user, repo_type, repo_id)
            if "json" in req.content_type:
                paths = req.json().get("paths", [])
            else:
                paths = parse_qs(req.body().decode("utf-8", "replace")).get("paths", [])
            return self._send_json(200, api.paths_info(user, repo_type, repo_id, arg or "main", paths))
        if method == "POST" and action in ("preupload", "commit"):
            revision, create_pr = arg or "main", req.flag("create_pr")
            api.check_commit(user, repo_type, repo_id, revision, create_pr)  # before the body is read
            if action == "preupload":
                return self._send_json(200, api.preupload(user, repo_type, repo_id, revision, req.json(), create_pr))
            result = api.commit(user, repo_type, repo_id, revision, req.ndjson(), create_pr, req.base)
            return self._send_json(200, result)
        if method == "POST" and action == "discussions" and len(rest) == 3 and rest[2] in ("merge", "status"):
            api.access.contributor(user, repo_type, repo_id)
            return self._send_json(200, api.change_pr(user, repo_type, repo_id, rest[1], rest[2], req.json(), req.base))
        if action in ("branch", "tag", "settings") and method in ("POST", "DELETE", "PUT"):
            api.access.writable(user, repo_type, repo_id)
        if action in ("branch", "tag") and method in ("POST", "DELETE") and arg:
            payload = req.json() if method == "POST" else {}
            return self._send_json(200, api.ref(user, method, repo_type, repo_id, action, arg, payload))
        if method == "PUT" and action == "settings":
            return self._send_json(200, api.settings(user, repo_type, repo_id, req.json()))
        raise HubError(404, f"Not found: {method} {self.path.split('?')[0]}")

    def _resolve(self, api: HubApi, req: Request, repo_type: str, repo_id: str, rev: str, path: str) -> None:
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


def _signed_in(req: Request, what: str) -> str:
    if req.user is None:
        raise HubError(401, f"You must be authenticated to {what}.")
    return req.user
