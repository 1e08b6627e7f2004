"""The model card: Hub metadata, license rule, lineage, accuracy table and plot, recipe, usage."""

from __future__ import annotations

import pytest
import yaml
from huggingface_hub import ModelCard

from hf_merge.evaluation import EvaluationReport
from hf_merge.hub.client import endpoint
from hf_merge.merging.state import MergeState
from hf_merge.publish.card import build_card, choose_license, read_license, write_card
from hf_merge.recipe import EvalSpec, MergeRecipe, known_methods

BASE = "openai/clip-vit-base-patch32"
EXPERTS = ["org/clip-sun397", "org/clip-dtd", "org/clip-mnist"]
SHAS = ["a" * 40, "b" * 40, "c" * 40]
TASKS = ["sun397", "dtd", "mnist"]


def _result_folder(tmp_path, *, evaluated=True, method="opcm"):
    state = MergeState(
        method=method,
        hyperparameters={"alpha": 0.5, "zero_diagonal": True} if method == "opcm" else {},
        base={"repo_id": BASE, "revision": None, "commit_sha": "f" * 40, "name": BASE},
        lineage=[{"repo_id": r, "revision": None, "commit_sha": s, "name": r, "step": i}
                 for i, (r, s) in enumerate(zip(EXPERTS, SHAS, strict=False), start=1)],
        step=3,
    )
    state.save(tmp_path)
    MergeRecipe(base=BASE, experts=EXPERTS, method=method, eval=EvalSpec(tasks=TASKS, every_step=True)).save(tmp_path)
    if evaluated:
        report = EvaluationReport(limit=100)
        rows = [[0.9], [0.8, 0.7], [0.75, 0.65, 0.95]]
        for step, row in enumerate(rows, start=1):
            results = {t: {"accuracy": a, "dataset": f"tanganke/{t}"} for t, a in zip(TASKS, row, strict=False)}
            report.add_step(step, results, TASKS[:step])
        report.to_json(tmp_path / "eval_results.json")
    return tmp_path


MIT = {BASE: "mit", **{e: "mit" for e in EXPERTS}}


def test_front_matter_has_every_field(tmp_path):
    folder = _result_folder(tmp_path)
    path = write_card(folder, repo_id="me/merged", licenses=MIT)
    card = ModelCard.load(path)  # parses the metadata, model-index included
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert data.base_model == [BASE, *EXPERTS]
    assert data.get("base_model_relation") == "merge"
    assert data.tags == ["merge", "hf-merge", "opcm", "continual-merging", "clip"]
    assert data.license == "mit"
    results = {r.dataset_name: r for r in data.eval_results}
    assert set(results) == set(TASKS)
    assert results["dtd"].metric_value == 0.65 and results["dtd"].dataset_type == "tanganke/dtd"
    assert results["dtd"].task_type == "zero-shot-image-classification" and results["dtd"].metric_type == "accuracy"
    assert data.model_name == "merged"


def test_body_sections(tmp_path):
    folder = _result_folder(tmp_path)
    text = build_card(folder, repo_id="me/merged", licenses=MIT, space_id="me/merged-demo").text
    assert "https://arxiv.org/abs/2501.09522" in text
    assert "| alpha | `0.5` |" in text and "| zero_diagonal | `True` |" in text
    for step, (repo, sha) in enumerate(zip(EXPERTS, SHAS, strict=False), start=1):
        assert f"| {step} | [{repo}]({endpoint()}/{repo}/tree/{sha}) | `{sha}` |" in text
    assert "| 3 | 75.0 | 65.0 | 95.0 | **78.3** |" in text
    assert "| 2 | 80.0 | 70.0 | – | **75.0** |" in text
    # BWT = mean(0.75 - 0.9, 0.65 - 0.7) = -0.10
    assert "backward transfer (BWT): **-10.0**" in text
    assert "at most 100 test examples per task" in text
    assert (folder / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert 'pipeline("zero-shot-image-classification", model="me/merged")' in text
    assert f"[me/merged-demo]({endpoint()}/spaces/me/merged-demo)" in text
    assert "hf-merge add me/merged --experts" in text
    recipe = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert MergeRecipe.from_yaml(recipe).experts == EXPERTS
    assert "License check needed" not in text


def test_without_evaluation_there_is_no_table_plot_or_model_index(tmp_path):
    folder = _result_folder(tmp_path, evaluated=False)
    card = ModelCard.load(write_card(folder, licenses=MIT))
    assert card.data.eval_results is None and "model-index" not in card.content.split("---")[1]
    assert "## Evaluation" not in card.text and not (folder / "accuracy.png").exists()
    assert f'model="{folder.resolve()}"' in card.text  # a local result: the snippet loads the folder


def test_license_rule():
    assert choose_license({"b": "mit", "e": "mit"}, "b") == ("mit", None)
    license_, note = choose_license({"b": "mit", "e": "apache-2.0"}, "b")
    assert license_ == "other" and "`e`: apache-2.0" in note and "`b`: mit" in note
    license_, note = choose_license({"b": None, "e": None}, "b")
    assert license_ == "other" and "none of the parent models declares a license" in note
    license_, note = choose_license({"b": None, "e": "mit"}, "b")
    assert license_ == "other" and "`b`: not declared" in note


def test_disagreeing_licenses_are_flagged_in_the_body(tmp_path):
    folder = _result_folder(tmp_path, evaluated=False)
    card = build_card(folder, licenses={**MIT, EXPERTS[1]: "cc-by-nc-4.0"})
    assert card.data.license == "other"
    assert "License check needed" in card.text and "cc-by-nc-4.0" in card.text


def test_read_license_from_a_model_folder(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [clip]\n---\n# model\n")
    assert read_license(tmp_path) == "apache-2.0"
    assert read_license(tmp_path / "missing") is None
    (tmp_path / "README.md").write_text("no front matter at all\n")
    assert read_license(tmp_path) is None


def test_regenerated_card_keeps_the_parents_licenses(tmp_path):
    from hf_merge.cli import main

    folder = _result_folder(tmp_path, evaluated=False)
    write_card(folder, repo_id="me/merged", licenses=MIT)
    (folder / "README.md").write_text((folder / "README.md").read_text().replace("# merged", "# edited"))
    assert main(["card", str(folder), "--repo-id", "me/merged", "-q"]) == 0
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and "# edited" not in card.text


@pytest.mark.parametrize("method", known_methods())
def test_every_method_has_a_described_card(method, tmp_path):
    from hf_merge.merging.methods import get_method

    declared = get_method(method)  # the card reads the method's own declaration
    title, paragraph = declared.card_title or declared.display_name, declared.description
    assert "arxiv.org/abs/" in paragraph or "openreview.net/forum?id=" in paragraph  # DOP: not on arXiv
    folder = _result_folder(tmp_path, evaluated=False, method=method)
    card = build_card(folder, licenses=MIT)
    assert method in card.data.tags and title in card.text and paragraph in card.text


def test_card_passes_the_servers_yaml_validation(tmp_path, hub_server):
    folder = _result_folder(tmp_path)
    card = build_card(folder, repo_id="me/merged", licenses=MIT)
    card.validate()  # POST /api/validate-yaml; raises ValueError on errors


@pytest.mark.slow
def test_final_only_evaluation_of_a_local_merge(tiny_base, tiny_experts, tmp_path):
    import json

    from hf_merge.api import merge

    result = merge(base=str(tiny_base), experts=[str(e) for e in tiny_experts[:2]], output=str(tmp_path / "out"),
                   eval={"tasks": ["synthetic/colors"], "limit": 8})
    report = json.loads((result.output_dir / "eval_results.json").read_text())
    assert len(report["accuracy_matrix"]) == 1 and report["steps"][0]["step"] == 2
    assert result.accuracy[0] is None and result.accuracy[1] == pytest.approx(report["accuracy_matrix"][0][0])
    card = ModelCard.load(result.output_dir / "README.md")
    assert card.data.base_model is None  # local folders are not Hub models
    assert f"| 2 | {100 * report['accuracy_matrix'][0][0]:.1f} |" in card.text
    assert [s["name"] for s in result.steps] == [str(e.resolve()) for e in tiny_experts[:2]]


@pytest.mark.slow
def test_add_evaluates_only_the_new_steps_of_an_unevaluated_merge(tiny_base, tiny_experts, tmp_path):
    import json

    from hf_merge.api import add, merge

    folder = tmp_path / "out"
    merge(base=str(tiny_base), experts=[str(e) for e in tiny_experts[:2]], output=str(folder))
    assert not (folder / "eval_results.json").exists()
    result = add(folder, [str(tiny_experts[2])], eval=EvalSpec(tasks=["synthetic/colors"], every_step=True, limit=8))
    report = json.loads((folder / "eval_results.json").read_text())
    assert [s["step"] for s in report["steps"]] == [3] and len(report["accuracy_matrix"]) == 1
    assert result.accuracy[:2] == [None, None] and result.accuracy[2] is not None
    text = (folder / "README.md").read_text()
    assert "\n| 3 | " in text.split("## Evaluation", 1)[1]
    assert result.commit_url is None  # a local folder is pushed nowhere unless asked


def test_reference_rows_for_the_base_and_the_experts(tmp_path):
    import json

    folder = _result_folder(tmp_path)
    report = json.loads((folder / "eval_results.json").read_text())
    report["base_accuracy"] = [0.5, 0.25, 0.125]
    report["expert_accuracy"] = [0.95, 0.9, None]  # the last expert was not evaluated
    (folder / "eval_results.json").write_text(json.dumps(report))
    text = build_card(folder, repo_id="me/merged", licenses=MIT).text
    assert "| *zero-shot (base)* | 50.0 | 25.0 | 12.5 | *29.2* |" in text
    assert "| *individual experts* | 95.0 | 90.0 | – | *92.5* |" in text


def test_no_reference_rows_without_references(tmp_path):
    text = build_card(_result_folder(tmp_path), repo_id="me/merged", licenses=MIT).text
    assert "zero-shot (base)" not in text and "individual experts" not in text


def test_tasks_sharing_a_local_loader_get_one_model_index_entry_each(tmp_path):
    """The Hub groups model-index results by dataset type: local data must not fold tasks together."""
    import json

    folder = _result_folder(tmp_path)
    report = json.loads((folder / "eval_results.json").read_text())
    for step in report["steps"]:
        for metrics in step["results"].values():
            metrics["dataset"] = "hf_merge.zoo.data:load_task"
    (folder / "eval_results.json").write_text(json.dumps(report))
    data = ModelCard.load(write_card(folder, repo_id="me/merged", licenses=MIT)).data
    assert sorted((r.dataset_type, r.dataset_name, r.metric_value) for r in data.eval_results) == [
        ("dtd", "dtd", 0.65), ("mnist", "mnist", 0.95), ("sun397", "sun397", 0.75)]
    index = yaml.safe_load(ModelCard.load(folder / "README.md").content.split("---")[1])["model-index"]
    assert len(index[0]["results"]) == 3
