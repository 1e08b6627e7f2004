"""Candidates whose cards hold odd YAML, or whose merge fails unexpectedly, never stop the watcher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, hf_hub_download

from hf_merge.testing.watch_models import fine_tune, lineage_of, merged_repo, publish
from hf_merge.watch.publish import RetryPolicy
from hf_merge.watch.runner import Watcher

pytestmark = pytest.mark.slow


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_bad_cards_and_a_crashing_candidate_do_not_stop_the_pass(hub_api, hub_url, alice_token, carol_token, tiny_base,
                                                                  tiny_experts, tmp_path, monkeypatch):
    repo, base = merged_repo(hub_api, alice_token, "watch-badcard", tiny_base, tiny_experts[:2], tmp_path, tasks=None)
    carol = HfApi(endpoint=hub_url, token=carol_token)
    shas = {}
    # Oldest first: the bad ones come before the good one in the pass.
    shas["carol/badcard-list"] = publish(carol, "carol/badcard-list", fine_tune(
        tiny_base, tmp_path / "list", base, seed=501, license="[mit, apache-2.0]"))
    shas["carol/badcard-odd"] = publish(carol, "carol/badcard-odd", fine_tune(
        tiny_base, tmp_path / "odd", base, seed=502, license="42", extra="model-index: {name: x}\ndatasets: 7"))
    shas["carol/badcard-crash"] = publish(carol, "carol/badcard-crash", fine_tune(tiny_base, tmp_path / "crash", base, seed=503))
    shas["carol/badcard-good"] = publish(carol, "carol/badcard-good", fine_tune(tiny_base, tmp_path / "good", base, seed=504))

    real_merge_into = Watcher._merge_into

    def merge_into(self, pending, candidate, policy):
        if candidate.repo_id == "carol/badcard-crash":  # a bug nobody foresaw, raised mid-merge
            raise RuntimeError("unforeseen\nsecond line")
        return real_merge_into(self, pending, candidate, policy)

    monkeypatch.setattr(Watcher, "_merge_into", merge_into)
    watcher = Watcher(repo, work_dir=tmp_path / "watcher", token=alice_token, retry=RetryPolicy(attempts=2, first_delay_s=0.1))
    outcomes = {o.repo_id: o for o in watcher.run_once()}

    assert {r: o.status for r, o in outcomes.items()} == {
        "carol/badcard-list": "merged", "carol/badcard-odd": "merged", "carol/badcard-crash": "refused",
        "carol/badcard-good": "merged",
    }
    assert outcomes["carol/badcard-crash"].reason == "error: RuntimeError: unforeseen"
    assert lineage_of(repo)[2:] == [(r, shas[r]) for r in ("carol/badcard-list", "carol/badcard-odd", "carol/badcard-good")]
    ledger = json.loads(Path(hf_hub_download(repo, "watch_ledger.json", force_download=True)).read_text())
    refused = {e["repo_id"]: (e["sha"], e["kind"]) for e in ledger["entries"] if e["status"] == "refused"}
    assert refused == {"carol/badcard-crash": (shas["carol/badcard-crash"], "error")}
    card = front_matter(Path(hf_hub_download(repo, "README.md", force_download=True)).read_text())
    assert card["license"] == "other"  # the parents' licences cannot be combined into one

    # Not retried at that commit, and later passes run.
    monkeypatch.setattr(Watcher, "_merge_into", real_merge_into)
    assert watcher.run_once() == []
    shutil.rmtree(tmp_path / "watcher")
    assert Watcher(repo, work_dir=tmp_path / "watcher", token=alice_token).run_once() == []  # the ledger on the Hub says so


def test_merge_with_an_expert_whose_license_is_a_list(tiny_base, tiny_experts, tmp_path, capsys):
    from hf_merge.cli import main

    expert = tmp_path / "expert"
    shutil.copytree(tiny_experts[0], expert)
    (expert / "README.md").write_text("---\nlicense: [mit, apache-2.0]\ntags: {a: 1}\n---\nA fine-tune.\n")
    out = tmp_path / "out"
    assert main(["merge", "--base", str(tiny_base), "--experts", str(expert), str(tiny_experts[1]), "--method", "average",
                 "--output", str(out), "-q"]) == 0
    text = (out / "README.md").read_text()
    assert front_matter(text)["license"] == "other"
