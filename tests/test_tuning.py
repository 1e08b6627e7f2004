"""``--tune`` in the engine: every candidate is merged from the same state, the best is kept, and a
tuned merge equals a plain merge run with the values it chose.

The scorers here are scripted (they prefer a given value, or score a property of the merged
tensors), so the choice is known in advance; the end-to-end tests score on real validation images.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_merge.errors import UsageError
from hf_merge.merging.engine import ContinualMerger
from hf_merge.merging.methods import get_method
from hf_merge.merging.tuning import StepTuner, TuningRecord, best_index, tuned_parameter

PROBE = "vision_model.encoder.layers.0.self_attn.q_proj.weight"


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def prefers(parameter: str, wanted_by_step, calls: list):
    """A scorer whose score is highest for the value ``wanted_by_step(step)``; it records what it saw."""

    def scorer(step, merged):
        value = current[parameter]
        calls.append((step, value, merged[PROBE].clone()))
        return -abs(value - wanted_by_step(step)), {"task": 1.0}

    current: dict = {}
    return scorer, current


class Spy(StepTuner):
    """A tuner that lets its scorer see the candidate's value (the scorer only gets tensors)."""

    def __init__(self, scorer, current, grid=None):
        super().__init__(scorer, grid)
        self.current = current

    def _score(self, step, weights, parameter, value, scores, details):
        self.current[parameter] = value
        super()._score(step, weights, parameter, value, scores, details)


def plain(base, experts, out, method, **hyper):
    with ContinualMerger(base, out, method, hyperparameters=hyper, device="cpu") as merger:
        merger.add_all(experts)
    return weights(out)


@pytest.mark.parametrize(("method", "parameter", "value"), [
    ("opcm", "alpha", 0.7),                 # alpha changes the state each step
    ("task_arithmetic", "scaling_factor", 0.3),
    ("iso_c", "scaling_factor", 1.2),
    ("tsv_m", "scaling_factor", 0.8),       # factors kept besides the weights
])
def test_a_tuned_merge_equals_the_plain_merge_with_the_chosen_value(method, parameter, value, tiny_base, tiny_experts, tmp_path):
    experts = tiny_experts[:3]
    calls: list = []
    scorer, current = prefers(parameter, lambda step: value, calls)
    tuner = Spy(scorer, current)
    with ContinualMerger(tiny_base, tmp_path / "tuned", method, device="cpu", tuner=tuner) as merger:
        merger.add_all(experts)
    expected = plain(tiny_base, experts, tmp_path / "plain", method, **{parameter: value})
    got = weights(tmp_path / "tuned")
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    grid = list(get_method(method).parameter(parameter).tune_grid)
    assert value in grid
    assert len(calls) == 3 * len(grid)  # every candidate of every step scored once
    state = json.loads((tmp_path / "tuned" / "merge_state.json").read_text())
    assert [r["step"] for r in state["tuning"]] == [1, 2, 3]
    assert all(r["chosen"] == value and r["grid"] == grid and r["parameter"] == parameter for r in state["tuning"])
    assert state["hyperparameters"][parameter] == value


def test_each_step_keeps_its_own_choice_and_candidates_start_from_the_same_state(tiny_base, tiny_experts, tmp_path):
    """OPCM with alpha 0.3 at step 2 and 0.9 at step 3: the candidates of a step all start from the
    state the previous step kept, and the result equals a merge resumed with each value in turn."""
    experts = tiny_experts[:3]
    wanted = {1: 0.5, 2: 0.3, 3: 0.9}
    calls: list = []
    scorer, current = prefers("alpha", wanted.__getitem__, calls)
    with ContinualMerger(tiny_base, tmp_path / "tuned", "opcm", device="cpu", tuner=Spy(scorer, current)) as merger:
        merger.add_all(experts)
    # the same merge, one plain step at a time, with the chosen alpha set before each step
    out = tmp_path / "by_hand"
    with ContinualMerger(tiny_base, out, "opcm", hyperparameters={"alpha": 0.5}, device="cpu", checkpoint_every=1) as merger:
        merger.add(experts[0])
    for step in (2, 3):
        state = json.loads((out / "merge_state.json").read_text())
        state["hyperparameters"]["alpha"] = wanted[step]
        (out / "merge_state.json").write_text(json.dumps(state))
        with ContinualMerger.resume(out, device="cpu") as merger:
            merger.add(experts[step - 1], final=True)
    tuned, by_hand = weights(tmp_path / "tuned"), weights(out)
    for name in by_hand:
        assert torch.equal(tuned[name], by_hand[name]), name
    records = json.loads((tmp_path / "tuned" / "merge_state.json").read_text())["tuning"]
    assert [r["chosen"] for r in records] == [0.5, 0.3, 0.9]
    # at step 3 the first candidate saw the state step 2 kept (alpha 0.3), not the last candidate's
    step3 = [c for c in calls if c[0] == 3]
    assert len(step3) == len(records[2]["grid"])


def test_the_written_output_is_the_kept_candidate_not_the_last_one_tried(tiny_base, tiny_experts, tmp_path):
    grid_first = get_method("task_arithmetic").parameter("scaling_factor").tune_grid[0]
    calls: list = []
    scorer, current = prefers("scaling_factor", lambda step: grid_first, calls)
    with ContinualMerger(tiny_base, tmp_path / "tuned", "task_arithmetic", device="cpu", checkpoint_every=1,
                         tuner=Spy(scorer, current)) as merger:
        merger.add_all(tiny_experts[:2])
    expected = plain(tiny_base, tiny_experts[:2], tmp_path / "plain", "task_arithmetic", scaling_factor=grid_first)
    got = weights(tmp_path / "tuned")
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_a_tuned_merge_resumes_with_the_value_it_kept(tiny_base, tiny_experts, tmp_path):
    calls: list = []
    scorer, current = prefers("alpha", lambda step: 0.7, calls)
    with ContinualMerger(tiny_base, tmp_path / "m", "opcm", device="cpu", tuner=Spy(scorer, current)) as merger:
        merger.add_all(tiny_experts[:2])
    with ContinualMerger.resume(tmp_path / "m", device="cpu") as merger:
        assert merger.method.hyperparameters["alpha"] == 0.7
        merger.add(tiny_experts[2], final=True)
    expected = plain(tiny_base, tiny_experts[:3], tmp_path / "plain", "opcm", alpha=0.7)
    got = weights(tmp_path / "m")
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    tuning = json.loads((tmp_path / "m" / "merge_state.json").read_text())["tuning"]
    assert [r["step"] for r in tuning] == [1, 2]  # the untuned third step adds no record


def test_an_all_at_once_method_is_tuned_once_over_its_single_merge(tiny_base, tiny_experts, tmp_path):
    calls: list = []
    scorer, current = prefers("scaling_factor", lambda step: 1.5, calls)
    experts = tiny_experts[:3]
    with ContinualMerger(tiny_base, tmp_path / "tuned", "iso_cts", device="cpu", tuner=Spy(scorer, current)) as merger:
        merger.add_all(experts)
    expected = plain(tiny_base, experts, tmp_path / "plain", "iso_cts", scaling_factor=1.5)
    got = weights(tmp_path / "tuned")
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    records = json.loads((tmp_path / "tuned" / "merge_state.json").read_text())["tuning"]
    assert len(records) == 1 and records[0]["step"] == 3 and records[0]["chosen"] == 1.5
    assert {c[0] for c in calls} == {3}


def test_a_scaling_of_the_output_is_merged_once_and_scored_per_value(tiny_base, tiny_experts, tmp_path, monkeypatch):
    """Iso-C's scaling only scales its output: a tuned step merges once and decomposes each matrix
    once per scoring pass, and every value's weights equal the plain merge's with that value."""
    from hf_merge.merging.methods.iso_c import IsoC

    steps = []
    monkeypatch.setattr(IsoC, "_step", lambda self, expert, original=IsoC._step: steps.append(1) or original(self, expert))
    seen = {}

    def scorer(step, merged):
        seen.setdefault(step, []).append({n: t.clone() for n, t in merged.items()})
        return float(step == 2 and len(seen[step]) == 3), {"task": 0.0}

    with ContinualMerger(tiny_base, tmp_path / "tuned", "iso_c", device="cpu", tuner=StepTuner(scorer)) as merger:
        merger.add_all(tiny_experts[:2])
    assert len(steps) == 2  # one merge per step, whatever the grid
    grid = get_method("iso_c").parameter("scaling_factor").tune_grid
    for index, value in enumerate(grid):
        expected = plain(tiny_base, tiny_experts[:2], tmp_path / f"plain-{index}", "iso_c", scaling_factor=value)
        assert all(torch.equal(seen[2][index][n], expected[n]) for n in seen[2][index])
    records = json.loads((tmp_path / "tuned" / "merge_state.json").read_text())["tuning"]
    assert records[1]["chosen"] == grid[2]
    assert all(torch.equal(t, seen[2][2][n]) for n, t in weights(tmp_path / "tuned").items() if n in seen[2][2])


def test_ties_keep_the_earlier_grid_value():
    assert best_index([0.4, 0.6, 0.6, 0.5]) == 1
    assert best_index([0.7]) == 0


def test_a_method_without_a_grid_cannot_be_tuned():
    with pytest.raises(UsageError, match="method 'dop' has no hyperparameter to tune.*opcm"):
        tuned_parameter(get_method("dop"))
    with pytest.raises(UsageError, match="method 'average' has no hyperparameter to tune"):
        tuned_parameter(get_method("average"))


def test_a_grid_value_out_of_the_declared_range_is_refused(tiny_base, tiny_experts, tmp_path):
    tuner = StepTuner(lambda step, merged: (0.0, {}), grid=[0.5, 1.5])
    with pytest.raises(UsageError, match="parameter 'alpha' must be in \\[0, 1\\], got 1.5"):
        with ContinualMerger(tiny_base, tmp_path / "m", "opcm", device="cpu", tuner=tuner) as merger:
            merger.add(tiny_experts[0], final=True)


def test_the_record_is_plain_data():
    record = TuningRecord(2, "alpha", [0.3, 0.5], [0.41, 0.44], 0.5, [{"a/val": 0.4}, {"a/val": 0.44}])
    assert json.loads(json.dumps(record.to_dict())) == {
        "step": 2, "parameter": "alpha", "grid": [0.3, 0.5], "scores": [0.41, 0.44], "chosen": 0.5,
        "per_task": [{"a/val": 0.4}, {"a/val": 0.44}]}


def test_task_arithmetic_given_a_new_scaling_is_the_sum_at_that_scaling(tiny_base, tiny_experts, tmp_path):
    """λ changed between steps (as --tune does) rescales what is merged so far: the model is θ0 + λ Σ τ
    with the new λ, the all-at-once task arithmetic of the experts so far, not a mix of λs."""
    out = tmp_path / "m"
    with ContinualMerger(tiny_base, out, "task_arithmetic", hyperparameters={"scaling_factor": 1.0}, device="cpu",
                         checkpoint_every=1) as merger:
        merger.add_all(tiny_experts[:2])
    state = json.loads((out / "merge_state.json").read_text())
    assert state["method_state"]["scaling_applied"] == 1.0
    state["hyperparameters"]["scaling_factor"] = 0.3
    (out / "merge_state.json").write_text(json.dumps(state))
    with ContinualMerger.resume(out, device="cpu") as merger:
        merger.add(tiny_experts[2], final=True)
    expected = plain(tiny_base, tiny_experts[:3], tmp_path / "plain", "task_arithmetic", scaling_factor=0.3)
    got = weights(out)
    base = weights(tiny_base)
    moved = [n for n in expected if not torch.equal(expected[n], base[n])]
    assert moved  # the experts do move the weights
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_records_read_back_from_another_repo_are_validated():
    """merge_state.json may come from another repo: anything that is not a record is left out,
    and the card and the watcher's gate read records only through this parser."""
    from hf_merge.merging.tuning import tuning_records
    from hf_merge.publish.card import tuning_context

    good = TuningRecord(2, "alpha", [0.3, 0.5], [0.41, 0.44], 0.5, [{"a/val": 0.4}, {"a/val": 0.44}]).to_dict()
    junk = [None, 3, "x", [], {"step": "2"}, {**good, "step": True}, {**good, "grid": [0.3]},
            {**good, "chosen": 0.7}, {**good, "scores": [0.1, float("nan")]}, {**good, "per_task": [{"a/val": 0.4}]},
            {**good, "per_task": [{"a/val": "0.4"}, {}]}, {**good, "parameter": ["alpha"]}]
    assert tuning_records(junk) == []
    assert tuning_records({"not": "a list"}) == [] and tuning_context(junk) is None
    (record,) = tuning_records([*junk, good])
    assert record == TuningRecord.read(good) and record.kept_scores() == {"a/val": 0.44}
    table = tuning_context([good])
    assert table["rows"] == [{"step": 2, "cells": ["41.0", "**44.0**"], "chosen": "0.5"}]
