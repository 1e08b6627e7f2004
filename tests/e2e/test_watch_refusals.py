"""Candidates the admission policy refuses: each with its reason, and no change to the merged model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, hf_hub_download

from hf_merge.testing.watch_models import (
    fine_tune,
    lineage_of,
    merged_repo,
    other_architecture,
    pickle_only,
    prediction_task,
    publish,
    with_nan,
)
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


def test_refused_candidates_are_recorded_with_their_reasons_and_change_no_weights(watched, hub_url, alice_token, carol_token, tiny_base):
    repo, base, work = watched
    carol = HfApi(endpoint=hub_url, token=carol_token)
    anonymous = HfApi(endpoint=hub_url)
    shas = {
        "carol/refuse-arch": publish(carol, "carol/refuse-arch", other_architecture(work / "arch", base)),
        "carol/refuse-pickle": publish(carol, "carol/refuse-pickle", pickle_only(tiny_base, work / "pickle", base)),
        "carol/refuse-nan": publish(carol, "carol/refuse-nan", with_nan(tiny_base, work / "nan", base)),
        "carol/refuse-license": publish(carol, "carol/refuse-license", fine_tune(tiny_base, work / "lic", base, seed=4545, license="gpl-3.0")),
        "carol/refuse-hurt": publish(carol, "carol/refuse-hurt", fine_tune(tiny_base, work / "hurt", base, seed=999, scale=10.0)),
    }
    policy = AdmissionPolicy(licenses=["mit", "apache-2.0"], max_forgetting=10.0, tasks={"carol/refuse-hurt": PROBE})
    before = _weights_and_state(anonymous, repo)
    watcher = Watcher(repo, work_dir=work / "watcher", token=alice_token, policy=policy,
                      retry=RetryPolicy(attempts=2, first_delay_s=0.1))
    outcomes = {o.repo_id: o for o in watcher.run_once()}

    assert {r: (o.status, o.sha) for r, o in outcomes.items()} == {r: ("refused", sha) for r, sha in shas.items()}
    arch = outcomes["carol/refuse-arch"].reason
    assert arch.startswith("architecture:") and "hidden_size is 48 instead of 32" in arch
    assert outcomes["carol/refuse-pickle"].reason.startswith("weights:") and "only pickle weights" in outcomes["carol/refuse-pickle"].reason
    assert outcomes["carol/refuse-nan"].reason.startswith("weights:") and "NaN" in outcomes["carol/refuse-nan"].reason
    assert outcomes["carol/refuse-license"].reason == "license: license 'gpl-3.0' is not allowed (mit, apache-2.0)"
    hurt = outcomes["carol/refuse-hurt"].reason
    assert hurt.startswith("quality: forgetting ") and "100.0 -> " in hurt and "more than max_forgetting 10" in hurt
    assert float(hurt.split("forgetting ")[1].split(" points")[0]) > 50

    # Weights and merge state as before; the decisions are in the repo's ledger and card.
    assert _weights_and_state(anonymous, repo) == before
    ledger = json.loads(Path(hf_hub_download(repo, "watch_ledger.json", force_download=True)).read_text())
    recorded = {e["repo_id"]: (e["sha"], e["status"], e["kind"]) for e in ledger["entries"]}
    kinds = {"carol/refuse-arch": "architecture", "carol/refuse-pickle": "weights", "carol/refuse-nan": "weights",
             "carol/refuse-license": "license", "carol/refuse-hurt": "quality"}
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
    fixed = publish(carol, "carol/refuse-license", fine_tune(tiny_base, work / "lic", base, seed=4545, license="mit"))
    again = watcher.run_once()
    assert [(o.repo_id, o.sha, o.status) for o in again] == [("carol/refuse-license", fixed, "merged")]
    assert lineage_of(repo)[-1] == ("carol/refuse-license", fixed)
    assert _weights_and_state(anonymous, repo)[0] != before[0]
    assert f"| carol/refuse-license | `{shas['carol/refuse-license'][:12]}` | " in ModelCard.load(repo).text  # the old refusal stays listed
