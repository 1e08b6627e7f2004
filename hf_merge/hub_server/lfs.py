"""Git LFS uploads of the local Hub: the batch endpoint and one-time upload tickets.

The client sends the file's bytes to the ``href`` the batch endpoint answers, without an
Authorization header, so the href carries a one-time ticket bound to the object (sha256, size)
and to the repo the upload is for. An object becomes reachable through a repo only once an
upload for that repo has been checked against its sha256 (stored once underneath however many
repos upload it); the batch answer never says whether some other repo holds it.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Iterable
from typing import Any

from hf_merge.hub_server.access import Access
from hf_merge.hub_server.git import HubError
from hf_merge.hub_server.storage import HubStorage

_TICKET_TTL_S = 3600
_MAX_TICKETS = 100_000  # pending uploads, all users together: tickets cost memory until used or expired
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class LfsEndpoint:
    """``POST /{p}{repo}.git/info/lfs/objects/batch`` and ``PUT /lfs-upload/{ticket}``."""

    def __init__(self, storage: HubStorage, access: Access):
        self.storage = storage
        self.access = access
        # ticket -> (sha256, size, expiry, (repo type, repo id) the upload is for)
        self._tickets: dict[str, tuple[str, int, float, tuple[str, str]]] = {}
        self._tickets_lock = threading.Lock()

    def batch(
        self, user: str | None, repo_type: str, repo_id: str, body: dict[str, Any], base: str
    ) -> dict[str, Any]:
        """Upload actions for the objects this repo does not hold yet.

        Whether *another* repo holds an object is never revealed: its bytes must be uploaded again
        for this repo (they are stored once all the same)."""
        self.access.contributor(user, repo_type, repo_id)  # pull requests upload too
        if body.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' operation is supported.")
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            if not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid oid or size."}})
                continue
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not (self.storage.repo_holds_lfs(repo_type, repo_id, oid) and self.storage.lfs_size(oid) == size):
                ticket = secrets.token_urlsafe(32)
                with self._tickets_lock:
                    now = time.monotonic()
                    if len(self._tickets) >= _MAX_TICKETS:
                        self._tickets = {key: value for key, value in self._tickets.items() if value[2] > now}
                    if len(self._tickets) >= _MAX_TICKETS:
                        raise HubError(429, "Too many uploads are pending on the local Hub; retry later.",
                                       headers={"Retry-After": "60"})
                    self._tickets[ticket] = (oid, size, now + _TICKET_TTL_S, (repo_type, repo_id))
                answer["actions"] = {"upload": {"href": f"{base}/lfs-upload/{ticket}", "expires_in": _TICKET_TTL_S}}
            objects.append(answer)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def upload(self, ticket: str, stream: Iterable[bytes], declared_length: int | None = None) -> None:
        """Store the body of a ``PUT`` to a ticket's href, checked against the promised sha256 and size.

        The ticket is checked before a byte is read, and so is a ``Content-Length`` that is not the
        promised size."""
        with self._tickets_lock:
            promised = self._tickets.pop(ticket, None)  # one-time, even if the upload then fails
        if promised is None or promised[2] < time.monotonic():
            raise HubError(403, "Upload ticket is unknown, used or expired; ask the LFS batch endpoint again.")
        oid, size, _, repo = promised
        if declared_length is not None and declared_length != size:
            raise HubError(400, f"Upload has {declared_length} bytes, {size} were announced.")
        self.storage.put_lfs(iter(stream), oid, size, repo=repo)
