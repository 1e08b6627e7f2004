"""The merge command's method flags come from the methods' declarations; one function builds every recipe."""

from __future__ import annotations

import pytest

from hf_merge.cli import build_parser
from hf_merge.cli.merge import _recipe_fields
from hf_merge.errors import RecipeError, UsageError
from hf_merge.merging.methods.registry import METHODS
from hf_merge.recipe import EvalSpec, MergeRecipe
from hf_merge.recipe_overrides import build_recipe

BASE, EXPERTS = "org/base", ["org/a", "org/b"]


def _fields(*argv: str) -> dict:
    return _recipe_fields(build_parser().parse_args(["merge", "--base", BASE, "--experts", *EXPERTS, *argv]))


def test_every_declared_flag_is_an_option_and_the_help_lists_every_method():
    text = build_parser()._subparsers._group_actions[0].choices["merge"].format_help()
    declared = {flag for cls in METHODS.values() for p in cls.parameters for flag in p.flags}
    assert declared >= {"--alpha", "--scaling", "--lambda", "--keep", "--zero-diagonal"}
    for flag in declared:
        assert flag in text
    assert "--no-zero-diagonal" in text
    for name, cls in METHODS.items():
        assert f"{name} ({cls.display_name})" in " ".join(text.split())


def test_a_flag_several_methods_declare_sets_the_chosen_methods_parameter():
    assert _fields("--method", "ties", "--lambda", "0.7")["parameters"] == {"scaling_factor": 0.7}
    assert _fields("--method", "magmax", "--scaling", "0.4")["parameters"] == {"scaling_factor": 0.4}
    assert _fields("--alpha", "0.6", "--no-zero-diagonal")["parameters"] == {"alpha": 0.6, "zero_diagonal": False}
    assert _fields("--method", "ties", "--keep", "0.1", "--param", "scaling_factor=0.2")["parameters"] == {
        "threshold": 0.1, "scaling_factor": 0.2}


def test_a_flag_the_chosen_method_does_not_declare_is_a_usage_error():
    with pytest.raises(UsageError, match=r"--keep is a parameter of ties, not of method 'opcm'"):
        _fields("--keep", "0.1")


def test_one_function_builds_the_recipe_for_the_api_the_cli_and_add():
    recipe = MergeRecipe(base=BASE, experts=EXPERTS, parameters={"alpha": 0.7},
                         eval=EvalSpec(tasks=["a", "b"], every_step=True))
    # Mappings merge key by key (--eval-limit keeps the tasks); an EvalSpec replaces the section.
    assert build_recipe(recipe, {"eval": {"limit": 5}}).eval == EvalSpec(tasks=["a", "b"], every_step=True, limit=5)
    assert build_recipe(recipe, {"eval": EvalSpec(tasks=["c"])}).eval == EvalSpec(tasks=["c"])
    # Parameters stay with their method: kept and merged for the same one, dropped for another.
    assert build_recipe(recipe, {"parameters": {"zero_diagonal": False}}).parameters == {"alpha": 0.7, "zero_diagonal": False}
    assert build_recipe(recipe, {"method": "average"}).parameters == {}
    assert build_recipe(None, {"base": BASE, "experts": EXPERTS, "output": None}).output is None
    with pytest.raises(RecipeError, match="`experts` required"):
        build_recipe(None, {"base": BASE})


def test_replace_clears_with_none_and_validates_again():
    recipe = MergeRecipe(base=BASE, experts=EXPERTS, push_to_hub="me/x", output="out")
    assert recipe.replace(push_to_hub=None).push_to_hub is None
    with pytest.raises(RecipeError, match="listed twice"):
        recipe.replace(experts=[EXPERTS[0], EXPERTS[0]])
