"""The local Hub's support for watchers: base_model relation tags, list_models sorting, webhooks."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from hf_merge.hub_server import LocalHubServer

TOKENS = {"carol": "hf_carol_secret_token_1", "dave": "hf_dave_secret_token_22"}


@pytest.fixture()
def hub(tmp_path):
    with LocalHubServer(tmp_path / "hub", tokens=TOKENS) as server:
        yield server


def _card(api: HfApi, repo_id: str, front_matter: str, extra: dict[str, bytes] | None = None) -> str:
    api.create_repo(repo_id, exist_ok=True)
    files = {"README.md": f"---\n{front_matter}\n---\n\ncard\n".encode(), **(extra or {})}
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
    return api.create_commit(repo_id, operations, commit_message=f"add {repo_id}").oid


def test_list_models_filters_by_base_model_relation_and_sorts_newest_first(hub):
    api = HfApi(endpoint=hub.url, token=TOKENS["carol"])
    _card(api, "carol/ft-old", "base_model: org/base")
    time.sleep(0.01)
    _card(api, "carol/adapter", "base_model: org/base", {"adapter_config.json": b"{}"})
    _card(api, "carol/merge", "base_model:\n- org/base\n- carol/ft-old")
    _card(api, "carol/quant", "base_model: org/base\nbase_model_relation: quantized")
    time.sleep(0.01)
    _card(api, "carol/ft-new", "base_model: org/base")
    _card(api, "carol/unrelated", "license: mit")

    def ids(**kwargs):
        return [m.id for m in api.list_models(**kwargs)]

    assert ids(filter="base_model:finetune:org/base", sort="created_at") == ["carol/ft-new", "carol/ft-old"]
    assert ids(filter="base_model:adapter:org/base") == ["carol/adapter"]
    assert ids(filter="base_model:quantized:org/base") == ["carol/quant"]
    assert ids(filter="base_model:merge:org/base") == ["carol/merge"]
    assert ids(filter="base_model:finetune:carol/ft-old") == []
    assert sorted(ids(filter="base_model:org/base")) == ["carol/adapter", "carol/ft-new", "carol/ft-old", "carol/merge", "carol/quant"]
    assert ids(filter="base_model:finetune:org/base", sort="created_at", limit=1) == ["carol/ft-new"]
    # A new commit moves a repo to the front of lastModified, not of createdAt.
    _card(api, "carol/ft-old", "base_model: org/base\nlicense: mit")
    assert ids(filter="base_model:finetune:org/base", sort="last_modified") == ["carol/ft-old", "carol/ft-new"]
    assert ids(filter="base_model:finetune:org/base", sort="created_at") == ["carol/ft-new", "carol/ft-old"]
    info = next(iter(api.list_models(filter="base_model:finetune:org/base", sort="created_at", limit=1)))
    assert info.created_at is not None and info.sha


class _Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, self.headers.get("X-Webhook-Secret"), json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhooks_are_registered_like_the_hub_and_delivered_on_every_commit(hub):
    receiver = HTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    carol = HfApi(endpoint=hub.url, token=TOKENS["carol"])
    dave = HfApi(endpoint=hub.url, token=TOKENS["dave"])
    try:
        hook = carol.create_webhook(url=url, watched=[{"type": "user", "name": "dave"}], secret="s3cret")
        assert (hook.url, hook.secret, hook.disabled, hook.domains) == (url, "s3cret", False, ["repo", "discussion"])
        assert [w.name for w in hook.watched] == ["dave"]
        assert [h.id for h in carol.list_webhooks()] == [hook.id] and dave.list_webhooks() == []
        assert carol.get_webhook(hook.id).url == url
        with pytest.raises(HfHubHTTPError):
            carol.create_webhook(url="http://example.com/hook", watched=[{"type": "user", "name": "dave"}])

        first = _card(dave, "dave/model", "base_model: org/base")
        second = _card(dave, "dave/model", "base_model: org/base\nlicense: mit")
        _card(carol, "carol/not-watched", "license: mit")
        dave.create_repo("dave/secret", private=True)
        _card(dave, "dave/secret", "license: mit")  # carol cannot read it, so she is not told
        hub.api.webhooks.wait_idle()
        assert [(path, secret) for path, secret, _ in _Receiver.received] == [("/hook", "s3cret")] * 2
        payload = _Receiver.received[1][2]
        assert payload["event"] == {"action": "update", "scope": "repo.content"}
        assert payload["repo"]["name"] == "dave/model" and payload["repo"]["type"] == "model"
        assert payload["repo"]["headSha"] == second and "license:mit" in payload["repo"]["tags"]
        assert payload["updatedRefs"] == [{"ref": "refs/heads/main", "oldSha": first, "newSha": second}]
        assert payload["webhook"] == {"id": hook.id, "version": 3}

        from huggingface_hub import WebhookPayload

        assert WebhookPayload(**payload).repo.name == "dave/model"  # the client's model parses it

        carol.disable_webhook(hook.id)
        _card(dave, "dave/model", "base_model: org/base\nlicense: apache-2.0")
        hub.api.webhooks.wait_idle()
        assert len(_Receiver.received) == 2
        carol.delete_webhook(hook.id)
        assert carol.list_webhooks() == []
    finally:
        receiver.shutdown()


def _read(body: bytes, *, declared: bool = True, pieces: int = 1):
    import asyncio

    from hf_merge.watch.webhook import read_delivery

    async def chunks():
        step = max(1, len(body) // pieces)
        for start in range(0, len(body), step):
            yield body[start:start + step]

    headers = {"content-length": str(len(body))} if declared else {}
    return asyncio.run(read_delivery(headers, chunks()))


def test_the_watchers_webhook_receiver_caps_bodies_and_refuses_deep_json():
    from hf_merge.watch.webhook import MAX_BODY_BYTES

    payload = {"event": {"scope": "repo.content"}, "repo": {"name": "a/b"}}
    assert _read(json.dumps(payload).encode()) == (200, payload)
    big = json.dumps({"pad": "x" * MAX_BODY_BYTES}).encode()
    assert _read(big)[0] == 413  # refused on its Content-Length
    assert _read(big, declared=False, pieces=64)[0] == 413  # chunked: refused once the cap is passed
    deep = b"[" * 100_000 + b"]" * 100_000
    assert _read(deep) == (400, {"error": "the body is JSON nested too deeply"})
    assert _read(b"{not json")[0] == 400


def test_a_delivery_over_a_mebibyte_leaves_the_tags_out(hub):
    receiver = HTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    carol = HfApi(endpoint=hub.url, token=TOKENS["carol"])
    try:
        carol.create_webhook(url=f"http://127.0.0.1:{receiver.server_address[1]}/hook",
                             watched=[{"type": "user", "name": "carol"}], secret="s")
        tags = "\n".join(f"- tag-{i:06d}-{'x' * 40}" for i in range(25_000))  # about 1.3 MB of tags
        sha = _card(carol, "carol/many-tags", f"tags:\n{tags}")
        hub.api.webhooks.wait_idle()
        [(_, _, payload)] = _Receiver.received
        assert payload["repo"]["headSha"] == sha and payload["repo"]["tags"] == []
        assert len(json.dumps(payload)) < 1 << 20
    finally:
        receiver.shutdown()
