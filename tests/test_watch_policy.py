"""The admission policy (a recipe's ``watch:`` section), the ledger and where a candidate's task comes from."""

from __future__ import annotations

import pytest

from hf_merge.errors import RecipeError
from hf_merge.recipe import MergeRecipe
from hf_merge.watch.gate import candidate_task
from hf_merge.watch.ledger import Ledger
from hf_merge.watch.policy import AdmissionPolicy, Refusal, load_policy_file

RECIPE = {"base": "org/base", "experts": ["org/a", "org/b"]}


def test_watch_section_round_trips_through_recipe_yaml(tmp_path):
    recipe = MergeRecipe.from_dict(RECIPE | {"watch": {"licenses": ["mit"], "max_forgetting": 2, "min_gain": 1.5,
                                                      "tasks": {"bob/x": "mnist"}, "eval_limit": 64}})
    assert recipe.watch == AdmissionPolicy(licenses=["mit"], max_forgetting=2, min_gain=1.5, tasks={"bob/x": "mnist"}, eval_limit=64)
    recipe.save(tmp_path)
    assert MergeRecipe.load(tmp_path).watch == recipe.watch
    assert "watch:\n  licenses:\n  - mit\n" in (tmp_path / "recipe.yaml").read_text()
    assert "watch" not in MergeRecipe.from_dict(RECIPE).to_dict()


@pytest.mark.parametrize("section, message", [
    ({"max_forgeting": 2}, "unknown key 'watch.max_forgeting' in recipe; did you mean 'watch.max_forgetting'?"),
    ({"licence": ["mit"]}, "unknown key 'watch.licence' in recipe; did you mean 'watch.licenses'?"),
    ({"max_forgetting": "a lot"}, "`watch.max_forgetting` must be a number of accuracy points, got 'a lot'"),
    ({"max_forgetting": -1}, "`watch.max_forgetting` must be >= 0, got -1"),
    ({"eval_limit": 0}, "`watch.eval_limit` must be a positive integer, got 0"),
    ({"allow_pickle": "yes"}, "`watch.allow_pickle` must be true or false, got 'yes'"),
    ({"owners": [1]}, "`watch.owners` must be a list of names, got [1]"),
    ({"tasks": ["mnist"]}, "`watch.tasks` must map repo ids to task names, got ['mnist']"),
    ("strict", "`watch` in recipe must be a mapping of policy fields, got str"),
])
def test_bad_policy_is_a_one_line_recipe_error(section, message):
    with pytest.raises(RecipeError) as error:
        MergeRecipe.from_dict(RECIPE | {"watch": section})
    assert str(error.value) == message


def test_metadata_checks_name_the_rule_that_refused():
    policy = AdmissionPolicy(licenses=["mit"], owners=["bob", "eve"], denied_owners=["eve"], required_tags=["clip"])
    assert policy.check_metadata("bob/x", license="mit", tags=["clip"]) is None
    assert policy.check_metadata("eve/x", license="mit", tags=["clip"]) == Refusal("owner", "owner 'eve' is denied by the policy")
    assert policy.check_metadata("zed/x", license="mit", tags=["clip"]).reason == "owner 'zed' is not in the allowed owners (bob, eve)"
    assert policy.check_metadata("bob/x", license=None, tags=["clip"]).reason == "license none declared is not allowed (mit)"
    assert policy.check_metadata("bob/x", license="mit", tags=[]) == Refusal("tags", "missing required tag clip")
    assert AdmissionPolicy().check_metadata("anyone/x", license=None, tags=[]) is None


def test_policy_file_with_or_without_the_watch_key(tmp_path):
    (tmp_path / "a.yaml").write_text("watch:\n  licenses: [mit]\n")
    (tmp_path / "b.yaml").write_text("min_gain: 1\n")
    (tmp_path / "c.yaml").write_text("watch:\n  min_gian: 1\n")
    assert load_policy_file(str(tmp_path / "a.yaml")).licenses == ["mit"]
    assert load_policy_file(str(tmp_path / "b.yaml")).min_gain == 1
    with pytest.raises(RecipeError, match=r"did you mean 'watch.min_gain'\?"):
        load_policy_file(str(tmp_path / "c.yaml"))
    with pytest.raises(RecipeError, match="does not exist"):
        load_policy_file(str(tmp_path / "missing.yaml"))


def test_candidate_task_from_policy_then_model_index_then_datasets():
    policy = AdmissionPolicy(tasks={"bob/declared": "mnist"})
    assert candidate_task("bob/declared", {"datasets": ["eurosat"]}, policy) == "mnist"
    index = {"model-index": [{"name": "x", "results": [{"dataset": {"name": "EuroSAT", "type": "tanganke/eurosat"}}]}]}
    assert candidate_task("bob/x", index, policy) == "eurosat"
    assert candidate_task("bob/x", {"datasets": ["unknown/thing", "tanganke/gtsrb"]}, policy) == "gtsrb"
    assert candidate_task("bob/x", {}, policy) is None


def test_ledger_keys_by_commit_and_keeps_final_decisions(tmp_path):
    ledger = Ledger()
    ledger.record("bob/x", "a" * 40, "refused", reason="license 'gpl' is not allowed", kind="license")
    ledger.record("bob/x", "b" * 40, "merging")
    ledger.save(tmp_path)
    loaded = Ledger.load(tmp_path)
    assert loaded.decided("bob/x", "a" * 40) and not loaded.decided("bob/x", "b" * 40)
    assert not loaded.decided("bob/x", "c" * 40)  # a new commit is a new candidate
    assert [e["key"] for e in loaded.to_card()] == [f"bob/x@{'a' * 40}"]
    other = Ledger()
    other.record("bob/x", "b" * 40, "merged")
    assert loaded.update(other) and loaded.get("bob/x", "b" * 40).status == "merged"
    (tmp_path / "watch_ledger.json").write_text("{not json")
    assert Ledger.load(tmp_path).entries == {}
