"""One HTTP request as the routes see it: path segments, query, body (already read), the user.

Also the ``Range`` header's grammar, the one part of parsing that downloads need.
"""

from __future__ import annotations

import json
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


@dataclass
class Request:
    """The parts of a request the routes need, body already read."""

    method: str
    segments: list[str]
    query: dict[str, list[str]]
    body: bytes
    content_type: str
    user: str | None
    base: str

    def json(self) -> dict[str, Any]:
        if not self.body:
            return {}
        try:
            data = json.loads(self.body)
        except ValueError as error:
            raise HubError(400, f"Request body is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise HubError(400, "Request body must be a JSON object.")
        return data

    def ndjson(self) -> list[dict[str, Any]]:
        """The lines of an ``application/x-ndjson`` body, each a JSON object (the commit endpoint)."""
        lines = []
        for number, line in enumerate(self.body.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as error:
                raise HubError(400, f"Commit body line {number} is not valid JSON (expected ndjson): {error}") from error
            if not isinstance(item, dict):
                raise HubError(400, f"Commit body line {number} must be a JSON object with 'key' and 'value'.")
            lines.append(item)
        return lines

    def flag(self, name: str) -> bool:
        return (self.query.get(name) or [""])[-1].lower() in ("1", "true", "yes")
