"""Webhooks of the local Hub: registration as ``HfApi.create_webhook`` calls it, and delivery.

Registration (``/api/settings/webhooks``): ``POST`` creates (``{"watched", "url", "domains"?,
"secret"?}`` -> ``{"webhook": {...}}``), ``GET`` lists (a bare list), ``GET|DELETE …/{id}``
reads or deletes, ``POST …/{id}/enable|disable``. Webhooks are kept in ``<root>/webhooks.json`` so a
restarted server still delivers them.

Delivery: after every commit on a watched repo (or any repo of a watched user), one ``POST`` in the
Hub's payload format (event ``update`` / scope ``repo.content``, the repo with its ``headSha``, the
updated ref) with the webhook's secret in ``X-Webhook-Secret``; a payload over 1 MiB is sent
without the repo's tags. Deliveries go out from one
background thread, in commit order. Only loopback URLs are accepted: the local Hub must never be a
way to make requests to other machines.
"""

from __future__ import annotations

import hashlib
import json
import queue
import secrets
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hf_merge.hub_server.git import HubError
from hf_merge.log import get_logger

logger = get_logger(__name__)

_FILENAME = "webhooks.json"
_WATCHED_TYPES = ("model", "dataset", "space", "user", "org")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_TIMEOUT_S = 30
# What a receiver may cap a delivery at (hf-merge's watcher: 1 MiB); a card with thousands of tags
# must not make every delivery of its repo bounce.
MAX_DELIVERY_BYTES = 1 << 20


def _object_id(text: str) -> str:
    """A 24-hex id, the shape of the Hub's MongoDB ids."""
    return hashlib.sha1(text.encode()).hexdigest()[:24]


class WebhookRegistry:
    """Registered webhooks (per owner) and their delivery thread."""

    def __init__(self, root: str | Path):
        self.path = Path(root) / _FILENAME
        self._lock = threading.Lock()
        self._hooks: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self._hooks = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError:
                logger.warning("Ignoring unreadable %s", self.path)
        self._queue: queue.Queue[tuple[dict[str, Any], dict[str, Any]]] = queue.Queue()
        self._worker: threading.Thread | None = None
        self.delivered: list[dict[str, Any]] = []  # (webhook id, status) of recent deliveries, for tests

    # ---- registration -----------------------------------------------------------------------------
    def handle(self, user: str | None, method: str, rest: list[str], body: dict[str, Any]) -> tuple[int, Any]:
        """Serve ``/api/settings/webhooks[/{id}[/enable|disable]]`` for ``user``."""
        if user is None:
            raise HubError(401, "Webhooks need a token.")
        if not rest and method == "GET":
            return 200, [self._public(h) for h in self._owned(user)]
        if not rest and method == "POST":
            return 200, {"webhook": self._public(self._create(user, body))}
        hook = self._hooks.get(rest[0]) if rest else None
        if hook is None or hook["owner"] != user:
            raise HubError(404, "Webhook not found.")
        if len(rest) == 1 and method == "GET":
            return 200, {"webhook": self._public(hook)}
        if len(rest) == 1 and method == "DELETE":
            with self._lock:
                self._hooks.pop(rest[0], None)
                self._save()
            return 200, {}
        if len(rest) == 1 and method == "POST":
            return 200, {"webhook": self._public(self._update(hook, body))}
        if len(rest) == 2 and rest[1] in ("enable", "disable") and method == "POST":
            with self._lock:
                hook["disabled"] = rest[1] == "disable"
                self._save()
            return 200, {"webhook": self._public(hook)}
        raise HubError(404, "Not found.")

    def _create(self, user: str, body: dict[str, Any]) -> dict[str, Any]:
        hook = {"id": _object_id(f"{user}/{secrets.token_hex(8)}"), "owner": user, "disabled": False}
        return self._update(hook, {"domains": ["repo", "discussion"], **body})

    def _update(self, hook: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        watched = body.get("watched", hook.get("watched"))
        if not isinstance(watched, list) or not watched:
            raise HubError(400, "A webhook needs `watched`: a list of {type, name}.")
        for item in watched:
            if not isinstance(item, dict) or item.get("type") not in _WATCHED_TYPES or not item.get("name"):
                raise HubError(400, f"Invalid watched item {item!r}; type is one of {', '.join(_WATCHED_TYPES)}.")
        url = body.get("url", hook.get("url"))
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise HubError(400, "A webhook needs a `url` (http or https).")
        if urlsplit(url).hostname not in _LOOPBACK:
            raise HubError(400, "The local Hub delivers webhooks to loopback URLs only (127.0.0.1, localhost).")
        updated = dict(hook)
        updated.update(watched=[{"type": i["type"], "name": i["name"]} for i in watched], url=url,
                       domains=list(body.get("domains") or hook.get("domains") or ["repo", "discussion"]))
        if "secret" in body:
            updated["secret"] = body["secret"]
        with self._lock:
            self._hooks[updated["id"]] = updated
            self._save()
        return updated

    def _owned(self, user: str) -> list[dict[str, Any]]:
        with self._lock:
            return [h for h in self._hooks.values() if h["owner"] == user]

    @staticmethod
    def _public(hook: dict[str, Any]) -> dict[str, Any]:
        """The shape ``WebhookInfo`` parses; the owner is ours only."""
        return {k: hook.get(k) for k in ("id", "url", "watched", "domains", "secret", "disabled")} | {"job": None}

    def _save(self) -> None:
        tmp = self.path.with_name(f".{_FILENAME}.tmp")
        tmp.write_text(json.dumps(self._hooks, indent=1), encoding="utf-8")
        tmp.replace(self.path)

    # ---- delivery ---------------------------------------------------------------------------------
    def notify_commit(self, *, repo_type: str, repo_id: str, private: bool, ref: str, old_sha: str | None,
                      new_sha: str, base: str, tags: list[str] | None = None) -> None:
        """Queue one ``repo.content`` delivery per webhook watching ``repo_id`` (or its namespace)."""
        namespace = repo_id.split("/", 1)[0]
        with self._lock:
            # A private repo is only reported to its own namespace's webhooks, as only it may read it.
            hooks = [dict(h) for h in self._hooks.values() if not h.get("disabled") and "repo" in h.get("domains", [])
                     and (not private or h["owner"] == namespace)
                     and any((w["type"] == repo_type and w["name"] == repo_id)
                             or (w["type"] in ("user", "org") and w["name"] == namespace) for w in h["watched"])]
        if not hooks:
            return
        prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
        for hook in hooks:
            payload: dict[str, Any] = {
                "event": {"action": "update", "scope": "repo.content"},
                "repo": {
                    "type": repo_type, "name": repo_id, "id": _object_id(f"{repo_type}/{repo_id}"), "private": private,
                    "url": {"web": f"{base}/{prefix}{repo_id}", "api": f"{base}/api/{repo_type}s/{repo_id}"},
                    "headSha": new_sha, "tags": list(tags or []), "owner": {"id": _object_id(namespace)},
                },
                "updatedRefs": [{"ref": ref, "oldSha": old_sha, "newSha": new_sha}],
                "webhook": {"id": hook["id"], "version": 3},
            }
            if len(json.dumps(payload)) > MAX_DELIVERY_BYTES:
                payload["repo"]["tags"] = []
            self._queue.put((hook, payload))
        self._start_worker()

    def _start_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._deliver_forever, name="local-hub-webhooks", daemon=True)
                self._worker.start()

    def _deliver_forever(self) -> None:
        while True:
            hook, payload = self._queue.get()
            headers = {"Content-Type": "application/json", "User-Agent": "hf-merge-local-hub-webhooks"}
            if hook.get("secret"):
                headers["X-Webhook-Secret"] = hook["secret"]
            request = urllib.request.Request(hook["url"], data=json.dumps(payload).encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
                    status = response.status
            except urllib.error.HTTPError as error:
                status = error.code
            except OSError as error:  # the receiver is down: the Hub drops the delivery too
                logger.info("Webhook %s: delivery failed (%s)", hook["id"], type(error).__name__)
                status = None
            self.delivered.append({"webhook": hook["id"], "repo": payload["repo"]["name"],
                                   "sha": payload["repo"]["headSha"], "status": status})
            self._queue.task_done()

    def wait_idle(self) -> None:
        """Block until every queued delivery has been attempted (tests)."""
        self._queue.join()
