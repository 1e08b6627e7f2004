"""``hf-merge watch`` polling: another user pushes a fine-tune of the base; the merged repo follows."""

from __future__ import annotations

import threading
import time

import pytest
from huggingface_hub import HfApi, ModelCard

from hf_merge.testing.watch_models import fine_tune, lineage_of, merged_repo, publish, wait_until
from hf_merge.watch.publish import RetryPolicy
from hf_merge.watch.runner import Watcher

pytestmark = pytest.mark.slow
TASK = "synthetic/colors"



@pytest.fixture(scope="module")
def watched(hub_api, alice_token, tiny_base, tiny_experts, tmp_path_factory):
    work = tmp_path_factory.mktemp("watch-poll")
    repo, base = merged_repo(hub_api, alice_token, "watch-poll", tiny_base, tiny_experts[:2], work, tasks=[TASK, TASK])
    return repo, base, work


def test_running_watcher_merges_each_commit_of_a_fine_tune_exactly_once(watched, hub_url, alice_token, carol_token, tiny_base):
    repo, base, work = watched
    carol = HfApi(endpoint=hub_url, token=carol_token)
    titles_before = [c.title for c in HfApi(endpoint=hub_url).list_repo_commits(repo)]
    watcher = Watcher(repo, work_dir=work / "watcher", token=alice_token, retry=RetryPolicy(attempts=2, first_delay_s=0.1))
    stop = threading.Event()
    thread = threading.Thread(target=watcher.watch, args=(0.3, stop), daemon=True)
    thread.start()
    try:
        folder = fine_tune(tiny_base, work / "bob-ft", base, seed=4242, extra=f"datasets:\n- {TASK}")
        first = publish(carol, "carol/watch-poll-ft", folder)
        assert wait_until(lambda: ("carol/watch-poll-ft", first) in lineage_of(repo))
        assert lineage_of(repo)[-1] == ("carol/watch-poll-ft", first)

        # The same files again: the client makes no commit, the sha stays, and nothing is merged twice.
        assert publish(carol, "carol/watch-poll-ft", folder) == first
        assert watcher.consider("carol/watch-poll-ft", first).status == "skipped"
        time.sleep(1.5)  # several passes
        assert lineage_of(repo).count(("carol/watch-poll-ft", first)) == 1

        # A new commit of the same repo is a new candidate.
        folder = fine_tune(tiny_base, work / "bob-ft", base, seed=4343, extra=f"datasets:\n- {TASK}")
        second = publish(carol, "carol/watch-poll-ft", folder, message="Train longer")
        assert second != first
        assert wait_until(lambda: ("carol/watch-poll-ft", second) in lineage_of(repo))
    finally:
        stop.set()
        thread.join(timeout=60)
    lineage = lineage_of(repo)
    assert lineage[-2:] == [("carol/watch-poll-ft", first), ("carol/watch-poll-ft", second)]
    assert len(lineage) == 4
    titles = [c.title for c in HfApi(endpoint=hub_url).list_repo_commits(repo)]
    ours = titles[: len(titles) - len(titles_before)]
    assert ours == [f"hf-merge watch: add carol/watch-poll-ft@{second[:10]}", f"hf-merge watch: add carol/watch-poll-ft@{first[:10]}"]
    card = ModelCard.load(repo)
    assert f"`{first}`" in card.text and f"`{second}`" in card.text
    assert "\n| 4 | " in card.text  # the candidates' task (from their cards) continued the per-step table
    assert "carol/watch-poll-ft" in card.data.base_model


def test_review_pr_opens_a_pull_request_and_leaves_main_alone(watched, hub_url, alice_token, carol_token, tiny_base):
    repo, base, work = watched
    folder = fine_tune(tiny_base, work / "bob-pr", base, seed=4444)
    sha = publish(HfApi(endpoint=hub_url, token=carol_token), "carol/watch-poll-pr", folder)
    lineage_before = lineage_of(repo)
    watcher = Watcher(repo, work_dir=work / "watcher-pr", token=alice_token, review="pr")
    outcomes = watcher.run_once()
    assert [(o.repo_id, o.sha, o.status) for o in outcomes] == [("carol/watch-poll-pr", sha, "proposed")]
    assert "/discussions/" in outcomes[0].url
    # main gets no merge, only the ledger's note of the open pull request.
    assert lineage_of(repo) == lineage_before
    assert HfApi(endpoint=hub_url).list_repo_commits(repo)[0].title == "hf-merge watch: record candidates considered"
    assert watcher.run_once() == []  # proposed once, not again at every pass
    assert Watcher(repo, work_dir=work / "watcher-pr-2", token=alice_token, review="pr").run_once() == []


def test_a_refused_push_keeps_the_result_and_the_next_pass_pushes_it(watched, hub_url, alice_token, carol_token, tiny_base):
    repo, base, work = watched
    sha = publish(HfApi(endpoint=hub_url, token=carol_token), "carol/watch-poll-kept",
                  fine_tune(tiny_base, work / "bob-kept", base, seed=4646))
    commits = len(HfApi(endpoint=hub_url).list_repo_commits(repo))
    # Carol may read the merged repo but not write it: the merge is done, the push refused (403).
    outcomes = Watcher(repo, work_dir=work / "watcher-kept", token=carol_token,
                       retry=RetryPolicy(attempts=2, first_delay_s=0.1)).run_once()
    assert [(o.repo_id, o.status) for o in outcomes] == [("carol/watch-poll-kept", "failed")]
    assert "403" in outcomes[0].reason and "kept in" in outcomes[0].reason and carol_token not in outcomes[0].reason
    kept = list((work / "watcher-kept" / "ready").iterdir())
    assert [p.name for p in kept] == [f"carol--watch-poll-kept@{sha}"]
    assert len(HfApi(endpoint=hub_url).list_repo_commits(repo)) == commits
    # With a token that may write, the next pass pushes the kept result instead of merging again.
    assert Watcher(repo, work_dir=work / "watcher-kept", token=alice_token).run_once() == []
    assert lineage_of(repo)[-1] == ("carol/watch-poll-kept", sha)
    assert len(HfApi(endpoint=hub_url).list_repo_commits(repo)) == commits + 1
    assert not (work / "watcher-kept" / "ready" / f"carol--watch-poll-kept@{sha}").exists()
