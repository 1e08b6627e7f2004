"""Webhook mode: the Hub calls the watcher on every commit instead of the watcher polling the Hub.

Served by ``huggingface_hub``'s :class:`~huggingface_hub.WebhooksServer` (a Gradio app with a
FastAPI route per webhook), which checks the ``X-Webhook-Secret`` header: missing -> 401, wrong ->
403, and the handler is never called. A ``repo.content`` update of a model repo's ``main`` is put
on a queue and answered ``202`` at once (the Hub does not wait for a merge); one worker thread
takes deliveries in the order they arrived, so two deliveries at once are merged one after the
other, each on top of the previous result. The answer says the delivery's place in that order.

The route is ``POST /webhooks/watch``; register its URL on the Hub (Settings -> Webhooks, or
``HfApi.create_webhook``) watching the users or repos whose fine-tunes should be merged.

A delivery is a small JSON object (a few KiB): bodies over :data:`MAX_BODY_BYTES` (1 MiB) are
answered ``413`` without being read past the cap, and JSON nested too deeply to parse is a ``400``.
"""

import hmac
import itertools
import json
import queue
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from hf_merge.errors import UsageError
from hf_merge.log import get_logger
from hf_merge.watch.runner import Outcome, Watcher

logger = get_logger(__name__)

WEBHOOK_PATH = "watch"
MAX_BODY_BYTES = 1 << 20


async def read_delivery(headers: Mapping[str, str], chunks: AsyncIterator[bytes],
                        limit: int = MAX_BODY_BYTES) -> tuple[int, Any]:
    """A delivery's JSON body: ``(200, data)``, or ``(4xx, {"error": ...})`` for a body over
    ``limit`` bytes (413; checked on ``Content-Length`` first, then as it arrives), not JSON, or
    nested too deeply (400)."""
    too_large = 413, {"error": f"the body is larger than {limit} bytes; a Hub delivery is a few KiB"}
    declared = headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return too_large
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            return too_large
    try:
        return 200, json.loads(bytes(body))
    except ValueError:
        return 400, {"error": "the body is not JSON"}
    except RecursionError:
        return 400, {"error": "the body is JSON nested too deeply"}


@dataclass
class Delivery:
    """One accepted delivery: its place in the order, the repo and commit, and (once done) the outcome."""

    position: int
    repo_id: str
    sha: str | None
    outcome: Outcome | None = None
    error: str | None = None


class DeliveryQueue:
    """Deliveries in arrival order, processed one at a time by a worker thread."""

    def __init__(self, watcher: Watcher):
        self.watcher = watcher
        self.done: list[Delivery] = []
        self._queue: queue.Queue[Delivery] = queue.Queue()
        self._counter = itertools.count(1)
        self._order_lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="hf-merge-watch-webhooks", daemon=True)
        self._worker.start()

    def handle(self, data: Any) -> tuple[int, dict[str, Any]]:
        """Answer one delivery's JSON body: ``(status, body)``."""
        if not isinstance(data, dict) or not isinstance(data.get("event"), dict) or not isinstance(data.get("repo"), dict):
            return 400, {"error": "not a Hub webhook payload (no event or repo)"}
        event, repo = data["event"], data["repo"]
        if event.get("scope") != "repo.content" or repo.get("type") != "model" or not repo.get("name"):
            return 200, {"ignored": "only repo.content updates of model repos are watched"}
        sha = _main_sha(data)
        if sha is None:
            return 200, {"ignored": "no new commit on main (a pull request or a tag)"}
        with self._order_lock:  # the position and the queue order are the same order
            delivery = Delivery(position=next(self._counter), repo_id=str(repo["name"]), sha=sha)
            self._queue.put(delivery)
        return 202, {"queued": f"{delivery.repo_id}@{sha}", "position": delivery.position}

    def _work(self) -> None:
        while True:
            delivery = self._queue.get()
            try:
                delivery.outcome = self.watcher.consider(delivery.repo_id, delivery.sha)
                logger.info("Delivery %d (%s): %s", delivery.position, delivery.outcome.key, delivery.outcome.status)
            except Exception as error:  # one bad delivery must not stop the ones behind it
                delivery.error = f"{type(error).__name__}: {error}"
                logger.warning("Delivery %d (%s) failed: %s", delivery.position, delivery.repo_id, delivery.error)
            self.done.append(delivery)
            self._queue.task_done()

    def wait_idle(self) -> None:
        """Block until every accepted delivery has been processed."""
        self._queue.join()


def _main_sha(data: dict[str, Any]) -> str | None:
    """The new head of ``main``: from ``updatedRefs`` when sent, else the repo's ``headSha``."""
    refs = data.get("updatedRefs")
    if isinstance(refs, list) and refs:
        for ref in refs:
            if isinstance(ref, dict) and ref.get("ref") == "refs/heads/main" and ref.get("newSha"):
                return str(ref["newSha"])
        return None
    head = data["repo"].get("headSha") or data["repo"].get("head_sha")  # the client's model says head_sha
    return str(head) if head else None


def create_webhook_server(watcher: Watcher, *, secret: str | None) -> tuple[Any, DeliveryQueue]:
    """The ``WebhooksServer`` with the watcher's route, not launched yet, and its delivery queue.

    Raises:
        UsageError: no secret (anyone who finds the URL could then make the watcher work).
    """
    if not secret:
        raise UsageError("webhook mode needs a secret: pass --webhook-secret or set WEBHOOK_SECRET "
                         "(the same one as in the Hub's webhook settings)")
    import gradio as gr
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from huggingface_hub import WebhooksServer

    deliveries = DeliveryQueue(watcher)
    with gr.Blocks(title=f"hf-merge watch {watcher.merged_repo}") as ui:
        gr.Markdown(f"# hf-merge watcher of `{watcher.merged_repo}`\n\nThe Hub's webhook posts to `/webhooks/{WEBHOOK_PATH}`.")
    server = WebhooksServer(ui=ui, webhook_secret=secret)
    # Our own handle: `server.ui.close()` stops this app and no other Gradio app. WebhooksServer is
    # wrapped by huggingface_hub's `experimental` decorator, so it cannot be subclassed to declare it.
    setattr(server, "ui", ui)  # noqa: B010

    async def watch(request: Request):
        # The server already refused a missing or wrong secret; this compare is constant-time.
        if not hmac.compare_digest((request.headers.get("x-webhook-secret") or "").encode(), secret.encode()):
            return JSONResponse({"error": "Invalid webhook secret."}, status_code=403)
        status, data = await read_delivery(request.headers, request.stream())
        if status != 200:
            return JSONResponse(data, status_code=status)
        status, body = deliveries.handle(data)
        return JSONResponse(body, status_code=status)

    server.add_webhook(WEBHOOK_PATH)(watch)
    return server, deliveries


def serve_webhooks(watcher: Watcher, *, secret: str | None, host: str = "127.0.0.1", port: int = 7860,
                   block: bool = True) -> tuple[Any, DeliveryQueue]:
    """Launch the webhook server (``POST http://HOST:PORT/webhooks/watch``); blocks unless ``block=False``."""
    server, deliveries = create_webhook_server(watcher, secret=secret)
    # share=False: a local launch would otherwise open a public Gradio tunnel.
    server.launch(prevent_thread_lock=not block, share=False, server_name=host, server_port=port, quiet=True)
    return server, deliveries
