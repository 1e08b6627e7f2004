"""The watcher continues a ``--tune`` merge: the new step is tuned on the candidate's validation data
and the gate decides on those same scores, evaluating no merged model a second time."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import HfApi, hf_hub_download

from hf_merge.api import merge
from hf_merge.evaluation import Evaluator
from hf_merge.testing.watch_models import fine_tune, publish, publish_parents
from hf_merge.watch import gate
from hf_merge.watch.policy import AdmissionPolicy
from hf_merge.watch.runner import Watcher

pytestmark = pytest.mark.slow
TASK = "synthetic/colors"


def test_the_gate_reuses_the_scores_of_the_tuned_step(hub_api, hub_url, alice_token, carol_token, tiny_base, tiny_experts,
                                                      tmp_path, monkeypatch):
    base, experts = publish_parents(hub_api, "watch-tune", tiny_base, tiny_experts[:2])
    repo = "alice/watch-tune-merged"
    merge(base=base, experts=experts, method="task_arithmetic", tune=True,
          eval={"tasks": [TASK, TASK], "every_step": True, "limit": 8},
          output=str(tmp_path / "merged"), push_to_hub=repo, token=alice_token)
    folder = fine_tune(tiny_base, tmp_path / "carol-ft", base, seed=4343)
    sha = publish(HfApi(endpoint=hub_url, token=carol_token), "carol/watch-tune-ft", folder)

    evaluated: list[str] = []
    original = Evaluator.evaluate

    def spy(self, model, *args, **kwargs):
        if isinstance(model, str):
            evaluated.append(model)  # a model read from a folder: what the gate would evaluate
        return original(self, model, *args, **kwargs)

    gates: list[gate.GateResult] = []
    run_gate = gate.run_gate

    def recording_gate(*args, **kwargs):
        gates.append(run_gate(*args, **kwargs))
        return gates[-1]

    monkeypatch.setattr(Evaluator, "evaluate", spy)
    monkeypatch.setattr(gate, "run_gate", recording_gate)
    policy = AdmissionPolicy(max_forgetting=100.0, tasks={"carol/watch-tune-ft": TASK}, eval_limit=8)
    outcomes = Watcher(repo, work_dir=tmp_path / "watcher", token=alice_token, policy=policy).run_once()
    assert [(o.repo_id, o.sha, o.status) for o in outcomes] == [("carol/watch-tune-ft", sha, "merged")]

    state = json.loads(open(hf_hub_download(repo, "merge_state.json", force_download=True)).read())
    records = state["tuning"]
    assert [r["step"] for r in records] == [1, 2, 3]  # the watcher's step was tuned too
    kept = {r["step"]: r["per_task"][r["grid"].index(r["chosen"])]["synthetic/colors/val"] for r in records}
    (result,) = gates
    assert result.old_after == pytest.approx(100 * kept[3]) and result.old_before == pytest.approx(100 * kept[2])
    # neither the merged model before nor the candidate merge was read from its folder to be evaluated again
    assert [m for m in evaluated if m.startswith(str(tmp_path / "watcher"))] == []
    assert any(m.startswith("alice/watch-tune-base") for m in evaluated)  # the spy sees path evaluations
    recipe = hf_hub_download(repo, "recipe.yaml", force_download=True)
    assert "tune: true" in open(recipe).read()
