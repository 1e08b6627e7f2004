"""One HTTP request as the routes see it: path segments, query, the user, and its body on demand.

Also the ``Range`` header's grammar, the one part of parsing that downloads need.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hf_merge.hub_server.git import HubError


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> inclusive (start, end); ``None`` if unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            start, end = max(size - int(last), 0), size - 1
        else:
            start, end = int(first), (int(last) if last else size - 1)
    except ValueError:
        return None
    end = min(end, size - 1)
    return (start, end) if 0 <= start <= end else None


def _loads(text: str | bytes, what: str, hint: str = "") -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise HubError(400, f"{what} is not valid JSON{hint}: {error}") from error
    except RecursionError as error:  # thousands of nested brackets: refused, not a crash
        raise HubError(400, f"{what} is nested too deeply.") from error


@dataclass
class Request:
    """The parts of a request the routes need. The body is read only when a route asks for it,
    after the route has checked who may call it, and never past its cap (``json_limit`` or
    ``commit_limit`` bytes; 413 beyond)."""

    method: str
    segments: list[str]
    query: dict[str, list[str]]
    content_type: str
    user: str | None
    base: str
    read_body: Callable[[int], bytes]
    json_limit: int
    commit_limit: int

    def body(self) -> bytes:
        """The raw body (a form or JSON route), at most ``json_limit`` bytes (413 beyond)."""
        return self.read_body(self.json_limit)

    def json(self) -> dict[str, Any]:
        body = self.body()
        if not body:
            return {}
        data = _loads(body, "Request body")
        if not isinstance(data, dict):
            raise HubError(400, "Request body must be a JSON object.")
        return data

    def ndjson(self) -> list[dict[str, Any]]:
        """The lines of an ``application/x-ndjson`` body, each a JSON object (the commit endpoint)."""
        lines = []
        body = self.read_body(self.commit_limit)
        for number, line in enumerate(body.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            item = _loads(line, f"Commit body line {number}", " (expected ndjson)")
            if not isinstance(item, dict):
                raise HubError(400, f"Commit body line {number} must be a JSON object with 'key' and 'value'.")
            lines.append(item)
        return lines

    def flag(self, name: str) -> bool:
        return (self.query.get(name) or [""])[-1].lower() in ("1", "true", "yes")
