"""Candidates the admission policy refuses: each with its reason, and no change to the merged model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, hf_hub_download

from hf_merge.testing.watch_models import (fine_tune, lineage_of, merged_repo, other_architecture, pickle_only,
                                           prediction_task, publish, with_nan)
from hf_merge.watch.policy import AdmissionPolicy
from hf_merge.watch.publish import RetryPolicy
from hf_merge.watch.runner import Watcher

pytestmark = pytest.mark.slow
PROBE = "watch-probe"


@pytest.fixture(scope="module")
def watched(hub_api, alice_token, tiny_base, tiny_experts, tmp_path_factory):
    work = tmp_path_factory.mktemp("watch-refusals")
    # The merged model scores 100 % on this task by construction, so forgetting shows.
    prediction_task(tiny_base, PROBE, work / "probe")
    repo, base = merged_repo(hub_api, alice_token, "watch-refuse", tiny_base, tiny_experts[:2], work,
                             tasks=[PROBE, PROBE], eval_limit=None)
    return repo, base, work


def _weights_and_state(api: HfApi, repo: str) -> tuple[str, str]:
    info = api.model_info(repo, files_metadata=True)
    weights = next(s.lfs.sha256 for s in info.siblings if s.rfilename == "model.safetensors")
    state = Path(hf_hub_download(repo, "merge_state.json", revision=info.sha)).read_text()
    return weights, state


def test_refused_candidates_are_recorded_with_their_reasons_and_change_no_weights(watched, hub_url, alice_token, bob_token, tiny_base):
    repo, base, work = watched
    bob = HfApi(endpoint=hub_url, token=bob_token)
    anonymous = HfApi(endpoint=hub_url)
    shas = {
        "bob/refuse-arch": publish(bob, "bob/refuse-arch", other_architecture(work / "arch", base)),
        "bob/refuse-pickle": publish(bob, "bob/refuse-pickle", pickle_only(tiny_base, work / "pickle", base)),
        "bob/refuse-nan": publish(bob, "bob/refuse-nan", with_nan(tiny_base, work / "nan", base)),
        "bob/refuse-license": publish(bob, "bob/refuse-license", fine_tune(tiny_base, work / "lic", base, seed=4545, license="gpl-3.0")),
        "bob/refuse-hurt": publish(bob, "bob/refuse-hurt", fine_tune(tiny_base, work / "hurt", base, seed=999, scale=10.0)),
    }
    policy = AdmissionPolicy(licenses=["mit", "apache-2.0"], max_forgetting=10.0, tasks={"bob/refuse-hurt": PROBE})
    before = _weights_and_state(anonymous, repo)
    watcher = Watcher(repo, work_dir=work / "watcher", token=alice_token, policy=policy,
                      retry=RetryPolicy(attempts=2, first_delay_s=0.1))
    outcomes = {o.repo_id: o for o in watcher.run_once()}

    assert {r: (o.status, o.sha) for r, o in outcomes.items()} == {r: ("refused", sha) for r, sha in shas.items()}
    assert outcomes["bob/refuse-arch"].reason.startswith("architecture:") and "hidden_size is 48 instead of 32" in outcomes["bob/refuse-arch"].reason
    assert outcomes["bob/refuse-pickle"].reason.startswith("weights:") and "only pickle weights" in outcomes["bob/refuse-pickle"].reason
    assert outcomes["bob/refuse-nan"].reason.startswith("weights:") and "NaN" in outcomes["bob/refuse-nan"].reason
    assert outcomes["bob/refuse-license"].reason == "license: license 'gpl-3.0' is not allowed (mit, apache-2.0)"
    hurt = outcomes["bob/refuse-hurt"].reason
    assert hurt.startswith("quality: forgetting ") and "100.0 -> " in hurt and "more than max_forgetting 10" in hurt
    assert float(hurt.split("forgetting ")[1].split(" points")[0]) > 50

    # Weights and merge state as before; the decisions are in the repo's ledger and card.
    assert _weights_and_state(anonymous, repo) == before
    ledger = json.loads(Path(hf_hub_download(repo, "watch_ledger.json", force_download=True)).read_text())
    recorded = {e["repo_id"]: (e["sha"], e["status"], e["kind"]) for e in ledger["entries"]}
    kinds = {"bob/refuse-arch": "architecture", "bob/refuse-pickle": "weights", "bob/refuse-nan": "weights",
             "bob/refuse-license": "license", "bob/refuse-hurt": "quality"}
    assert recorded == {r: (shas[r], "refused", kinds[r]) for r in shas}
    text = ModelCard.load(repo).text
    section = text.split("## Considered and not merged", 1)[1].split("\n## ", 1)[0]
    for name, sha in shas.items():
        assert f"| {name} | `{sha[:12]}` | " in section
    assert "is not allowed (mit, apache-2.0)" in section

    # Never retried at the same commit, even by a fresh watcher that only knows the repo.
    assert watcher.run_once() == []
    fresh = Watcher(repo, work_dir=work / "fresh", token=alice_token, policy=policy)
    assert fresh.run_once() == []
    assert _weights_and_state(anonymous, repo)[0] == before[0]

    # A new commit of a refused candidate is considered again: with an allowed licence, it is merged.
    fixed = publish(bob, "bob/refuse-license", fine_tune(tiny_base, work / "lic", base, seed=4545, license="mit"))
    again = watcher.run_once()
    assert [(o.repo_id, o.sha, o.status) for o in again] == [("bob/refuse-license", fixed, "merged")]
    assert lineage_of(repo)[-1] == ("bob/refuse-license", fixed)
    assert _weights_and_state(anonymous, repo)[0] != before[0]
    assert f"| bob/refuse-license | `{shas['bob/refuse-license'][:12]}` | " in ModelCard.load(repo).text  # the old refusal stays listed
