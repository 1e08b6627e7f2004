"""Webhook mode: the local Hub calls the watcher on every commit; secrets are checked; deliveries queue."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from huggingface_hub import HfApi

from hf_merge.testing.net import free_port
from hf_merge.testing.watch_models import fine_tune, lineage_of, merged_repo, publish, wait_until
from hf_merge.watch.publish import RetryPolicy
from hf_merge.watch.runner import Watcher
from hf_merge.watch.webhook import serve_webhooks

pytestmark = pytest.mark.slow
SECRET = "webhook-secret-for-tests"


def _post(url: str, payload: dict, secret: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"X-Webhook-Secret": secret} if secret is not None else {})
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _payload(repo_id: str, sha: str) -> dict:
    return {"event": {"action": "update", "scope": "repo.content"},
            "repo": {"type": "model", "name": repo_id, "id": "0" * 24, "private": False, "headSha": sha,
                     "url": {"web": "", "api": ""}, "owner": {"id": "1" * 24}},
            "updatedRefs": [{"ref": "refs/heads/main", "oldSha": None, "newSha": sha}],
            "webhook": {"id": "2" * 24, "version": 3}}



@pytest.fixture(scope="module")
def served(hub_api, alice_token, tiny_base, tiny_experts, tmp_path_factory):
    work = tmp_path_factory.mktemp("watch-webhook")
    repo, base = merged_repo(hub_api, alice_token, "watch-hook", tiny_base, tiny_experts[:2], work)
    watcher = Watcher(repo, work_dir=work / "watcher", token=alice_token, retry=RetryPolicy(attempts=2, first_delay_s=0.1))
    port = free_port()
    server, deliveries = serve_webhooks(watcher, secret=SECRET, port=port, block=False)
    yield repo, base, work, f"http://127.0.0.1:{port}/webhooks/watch", deliveries
    server.ui.close()  # not gradio.close_all(): the session's Space fixture keeps running


def test_a_missing_or_wrong_secret_is_refused_and_nothing_is_merged(served, hub_url, carol_token, tiny_base):
    repo, base, work, url, deliveries = served
    sha = publish(HfApi(endpoint=hub_url, token=carol_token), "carol/watch-hook-intruder",
                  fine_tune(tiny_base, work / "intruder", base, seed=6001))
    before = lineage_of(repo)
    assert _post(url, _payload("carol/watch-hook-intruder", sha), "not-the-secret") == (403, {"error": "Invalid webhook secret."})
    assert _post(url, _payload("carol/watch-hook-intruder", sha), None)[0] == 401
    time.sleep(1.0)
    deliveries.wait_idle()
    assert deliveries.done == [] and lineage_of(repo) == before


def test_the_hubs_delivery_of_a_push_merges_the_fine_tune(served, hub_url, alice_token, carol_token, tiny_base):
    repo, base, work, url, deliveries = served
    alice = HfApi(endpoint=hub_url, token=alice_token)
    hook = alice.create_webhook(url=url, watched=[{"type": "user", "name": "carol"}], domains=["repo"], secret=SECRET)
    try:
        assert [h.id for h in alice.list_webhooks()] == [hook.id] and hook.secret == SECRET
        sha = publish(HfApi(endpoint=hub_url, token=carol_token), "carol/watch-hook-ft",
                      fine_tune(tiny_base, work / "ft", base, seed=6002))
        assert wait_until(lambda: ("carol/watch-hook-ft", sha) in lineage_of(repo))
    finally:
        alice.delete_webhook(hook.id)
    assert alice.list_webhooks() == []
    merged = [d for d in deliveries.done if d.repo_id == "carol/watch-hook-ft"]
    assert [(d.sha, d.outcome.status) for d in merged] == [(sha, "merged")]


def test_two_deliveries_at_once_merge_one_after_the_other_in_order(served, hub_url, carol_token, tiny_base):
    repo, base, work, url, deliveries = served
    carol = HfApi(endpoint=hub_url, token=carol_token)
    shas = {name: publish(carol, name, fine_tune(tiny_base, work / name.split("/")[1], base, seed=seed))
            for name, seed in (("carol/watch-hook-a", 6003), ("carol/watch-hook-b", 6004))}
    before = lineage_of(repo)
    answers: dict[str, tuple[int, dict]] = {}
    start = threading.Barrier(2)

    def deliver(name: str) -> None:
        start.wait()
        answers[name] = _post(url, _payload(name, shas[name]), SECRET)

    threads = [threading.Thread(target=deliver, args=(name,)) for name in shas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert {name: status for name, (status, _) in answers.items()} == {name: 202 for name in shas}
    order = sorted(shas, key=lambda name: answers[name][1]["position"])
    assert wait_until(lambda: len(lineage_of(repo)) == len(before) + 2)
    deliveries.wait_idle()
    assert lineage_of(repo) == before + [(name, shas[name]) for name in order]
    titles = [c.title for c in HfApi(endpoint=hub_url).list_repo_commits(repo)][:2]
    assert titles == [f"hf-merge watch: add {name}@{shas[name][:10]}" for name in reversed(order)]


def _post_raw(url: str, body: bytes, secret: str) -> int:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "X-Webhook-Secret": secret})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _declare_oversized(url: str, secret: str, size: int) -> int:
    """The answer to a delivery that declares ``size`` bytes, read before any body is sent: the
    receiver refuses on the header, and a client still sending would meet a closed connection."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.putrequest("POST", parts.path)
        for name, value in (("Content-Type", "application/json"), ("X-Webhook-Secret", secret),
                            ("Content-Length", str(size))):
            connection.putheader(name, value)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def test_an_oversized_or_deeply_nested_delivery_is_a_4xx(served):
    repo, base, work, url, deliveries = served
    before = len(deliveries.done)
    assert _declare_oversized(url, SECRET, 2 << 20) == 413
    assert _post_raw(url, b"[" * 100_000 + b"]" * 100_000, SECRET) == 400
    deliveries.wait_idle()
    assert len(deliveries.done) == before
