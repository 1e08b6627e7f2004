"""The merge recipe: YAML round trip, typo suggestions, duplicate models, parameter checks."""

from __future__ import annotations

import pytest

from hf_merge.errors import RecipeError, UsageError
from hf_merge.recipe import EvalSpec, MergeRecipe, method_parameters

BASE = "openai/clip-vit-base-patch32"
EXPERTS = [f"tanganke/clip-vit-base-patch32_{t}" for t in ("sun397", "dtd", "mnist")]


def test_yaml_round_trip_keeps_every_field(tmp_path):
    recipe = MergeRecipe(
        base=BASE,
        experts=EXPERTS,
        method="opcm",
        parameters={"alpha": 0.6, "zero_diagonal": False},
        eval=EvalSpec(tasks=["sun397", "dtd"], every_step=True, limit=50),
        output="out",
        push_to_hub="me/merged",
        private=True,
        space="me/merged-demo",
        seed=3,
        shuffle=True,
        evict=True,
    )
    path = recipe.save(tmp_path)
    assert path.name == "recipe.yaml"
    again = MergeRecipe.load(tmp_path)
    assert again == recipe
    assert again.eval.limit == 50 and again.parameters == {"alpha": 0.6, "zero_diagonal": False}


def test_defaults_are_left_out_of_the_yaml():
    text = MergeRecipe(base=BASE, experts=EXPERTS[:1]).to_yaml()
    assert text.splitlines() == ["base: openai/clip-vit-base-patch32", "experts:", f"- {EXPERTS[0]}", "method: opcm"]


def test_unknown_top_level_key_names_it_and_suggests_the_closest():
    with pytest.raises(RecipeError) as info:
        MergeRecipe.from_yaml(f"base: {BASE}\nexprts: [{EXPERTS[0]}]\n", source="recipe.yaml")
    message = str(info.value)
    assert "'exprts'" in message and "did you mean 'experts'" in message and "recipe.yaml" in message
    assert info.value.exit_code == 2
    assert "\n" not in message


def test_unknown_eval_key_is_reported_with_its_section():
    with pytest.raises(RecipeError, match=r"'eval.every_steps'.*did you mean 'eval.every_step'"):
        MergeRecipe.from_dict({"base": BASE, "experts": EXPERTS, "eval": {"tasks": ["dtd"], "every_steps": True}})


def test_method_parameter_typo_is_an_error_with_suggestion():
    with pytest.raises(RecipeError, match=r"unknown parameter 'alpah' for method 'opcm'; did you mean 'alpha'"):
        MergeRecipe(base=BASE, experts=EXPERTS, parameters={"alpah": 0.5})


def test_parameter_of_another_method_is_refused():
    with pytest.raises(RecipeError, match="'keep' for method 'opcm'"):
        MergeRecipe(base=BASE, experts=EXPERTS, method="opcm", parameters={"keep": 0.2})
    ties = MergeRecipe(base=BASE, experts=EXPERTS, method="ties", parameters={"keep": 0.1, "lambda": 0.3})
    assert ties.parameters == {"threshold": 0.1, "scaling_factor": 0.3}  # λ is the scaling factor


def test_parameter_types_are_checked():
    with pytest.raises(RecipeError, match="must be a number"):
        MergeRecipe(base=BASE, experts=EXPERTS, parameters={"alpha": "half"})
    with pytest.raises(RecipeError, match="must be true or false"):
        MergeRecipe(base=BASE, experts=EXPERTS, parameters={"zero_diagonal": "yes"})


def test_unknown_method_suggests_closest():
    with pytest.raises(RecipeError, match="unknown merge method 'opmc'; did you mean 'opcm'"):
        MergeRecipe(base=BASE, experts=EXPERTS, method="opmc")


def test_hyperparameters_fill_declared_defaults():
    recipe = MergeRecipe(base=BASE, experts=EXPERTS, parameters={"alpha": 0.7})
    declared = method_parameters("opcm")
    assert declared["alpha"] == 0.5
    assert recipe.hyperparameters()["alpha"] == 0.7
    assert set(declared) <= set(recipe.hyperparameters()) | {k for k, v in declared.items() if v is None}


def test_base_listed_as_expert_is_refused():
    with pytest.raises(RecipeError, match="base model .* is also listed as an expert"):
        MergeRecipe(base=BASE, experts=[EXPERTS[0], BASE])
    with pytest.raises(RecipeError, match="also listed as an expert"):
        MergeRecipe(base=BASE, experts=[f"{BASE}@main"])


def test_expert_listed_twice_is_refused():
    with pytest.raises(RecipeError, match=r"listed twice"):
        MergeRecipe(base=BASE, experts=[EXPERTS[0], EXPERTS[1], EXPERTS[0]])
    with pytest.raises(RecipeError, match=r"listed twice"):
        MergeRecipe(base=BASE, experts=[EXPERTS[0], f"{EXPERTS[0]}@main"])
    # Two different pinned revisions of one repo are two different models.
    recipe = MergeRecipe(base=BASE, experts=[f"{EXPERTS[0]}@v1", f"{EXPERTS[0]}@v2"])
    assert len(recipe.experts) == 2


def test_local_folders_are_compared_by_resolved_path(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(RecipeError, match="listed twice"):
        MergeRecipe(base=BASE, experts=[str(tmp_path / "a"), str(tmp_path / "." / "a")])


def test_missing_fields_and_bad_values():
    with pytest.raises(RecipeError, match="missing `experts`"):
        MergeRecipe.from_dict({"base": BASE})
    with pytest.raises(RecipeError, match="push_to_hub"):
        MergeRecipe(base=BASE, experts=EXPERTS, push_to_hub="no-namespace")
    with pytest.raises(RecipeError, match="scope"):
        MergeRecipe(base=BASE, experts=EXPERTS, scope="visoin")
    with pytest.raises(RecipeError, match="not valid YAML"):
        MergeRecipe.from_yaml("base: [unclosed\n")
    assert issubclass(RecipeError, UsageError)


def test_shuffle_is_seeded_and_keeps_every_expert():
    experts = [f"org/expert-{i}" for i in range(8)]
    a = MergeRecipe(base=BASE, experts=experts, seed=1, shuffle=True).ordered_experts()
    b = MergeRecipe(base=BASE, experts=experts, seed=1, shuffle=True).ordered_experts()
    c = MergeRecipe(base=BASE, experts=experts, seed=2, shuffle=True).ordered_experts()
    assert a == b and sorted(a) == sorted(experts) and a != experts and a != c
    assert MergeRecipe(base=BASE, experts=experts).ordered_experts() == experts


def test_eval_shorthand_and_output_dir():
    recipe = MergeRecipe.from_dict({"base": BASE, "experts": EXPERTS, "eval": "sun397, dtd", "push_to_hub": "me/x"})
    assert recipe.eval == EvalSpec(tasks=["sun397", "dtd"])
    assert str(recipe.output_dir()) == "x"
    assert str(MergeRecipe(base=BASE, experts=EXPERTS, method="average").output_dir()) == "merged-average"


def test_example_recipes_are_valid():
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    paper = MergeRecipe.load(examples / "paper_vit_b32_8tasks.yaml")
    assert paper.base == BASE and paper.method == "tsv_m" and paper.parameters == {"scaling_factor": 1.0}
    tasks = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert paper.experts == [f"tanganke/clip-vit-base-patch32_{t}" for t in tasks]
    assert paper.eval.tasks == tasks and paper.eval.every_step
    MergeRecipe.load(examples / "offline_demo.yaml")


def test_cli_flags_override_the_yaml(tmp_path, monkeypatch):
    """``--config`` plus flags: flags win; another --method drops the YAML's method parameters."""
    from pathlib import Path

    import hf_merge.api as api
    from hf_merge.cli import main

    class Stop(Exception):
        pass

    seen = []

    def fake_merge(recipe, **kwargs):
        seen.append(recipe)
        raise Stop

    monkeypatch.setattr(api, "merge", fake_merge)
    paper = str(Path(__file__).resolve().parents[1] / "examples" / "paper_vit_b32_8tasks.yaml")
    for argv in (["--method", "opcm", "--alpha", "0.7", "--eval-limit", "5"], ["--method", "ties", "--keep", "0.1", "--shuffle", "--seed", "4"]):
        with pytest.raises(Stop):
            main(["merge", "--config", paper, *argv])
    opcm, ties = seen
    assert opcm.method == "opcm" and opcm.parameters == {"alpha": 0.7}
    assert opcm.eval.limit == 5 and opcm.eval.every_step and len(opcm.eval.tasks) == 8
    assert ties.method == "ties" and ties.parameters == {"threshold": 0.1}
    assert ties.shuffle and ties.seed == 4 and ties.ordered_eval_tasks()[0] == ties.eval.tasks[
        ties.experts.index(ties.ordered_experts()[0])]
