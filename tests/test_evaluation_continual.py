"""Continual evaluation of a 3-step merge of tiny CLIP experts, the saved report, and `hf-merge eval`."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_merge.cli import main
from hf_merge.errors import EvaluationError
from hf_merge.evaluation import (
    ContinualEvaluator,
    DatasetSpec,
    EvaluationReport,
    Evaluator,
    Task,
    evaluate_model,
)
from hf_merge.evaluation.continual import RESULTS_FILENAME
from hf_merge.evaluation.synthetic import COLOR_NAMES
from hf_merge.testing.tiny_clip import make_expert

_COLORS = "hf_merge.evaluation.synthetic:solid_colors"
# Three tasks over different colours, so the experts' accuracies differ from task to task.
TASKS = [
    Task("colors-all", COLOR_NAMES, ("a photo of a {} square.", "a {} image."),
         DatasetSpec(kind="python", path=_COLORS, options={"n_per_class": 4})),
    Task("colors-bw", ("white", "black", "red", "blue"), ("a {} image.",),
         DatasetSpec(kind="python", path=_COLORS, options={"n_per_class": 6, "seed": 1,
                                                            "classes": ("white", "black", "red", "blue")})),
    Task("colors-mix", ("green", "yellow", "cyan", "magenta"), ("the colour {}.", "a photo of a {} square."),
         DatasetSpec(kind="python", path=_COLORS, options={"n_per_class": 6, "seed": 2,
                                                            "classes": ("green", "yellow", "cyan", "magenta")})),
]


@pytest.fixture(scope="module")
def experts(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-experts")
    # Large task vectors so the experts really differ from the base and from each other.
    return [make_expert(tiny_base, root / f"expert-{i}", seed=50 + i, scale=0.8) for i in range(3)]


def _save_model(out_dir, base_dir, tensors):
    """Write a merged model folder as the engine does: weights + the base's config and processor files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in base_dir.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            shutil.copy2(path, out_dir / path.name)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})


def _average(dirs):
    loaded = [load_file(d / "model.safetensors") for d in dirs]
    return {n: torch.stack([t[n].float() for t in loaded]).mean(0).to(loaded[0][n].dtype) for n in loaded[0]}


def test_model_equal_to_expert_k_scores_expert_k_on_task_k(tiny_base, experts, tmp_path):
    evaluator = ContinualEvaluator(TASKS, base=tiny_base, experts=experts, device="cpu")
    out = tmp_path / "merged"
    for step, expert in enumerate(experts, start=1):
        # A "merge" that keeps only the newest expert: after step k the model IS expert k.
        _save_model(out, tiny_base, load_file(expert / "model.safetensors"))
        report = evaluator(step, out, None)
    matrix = report.accuracy_matrix()
    direct = [evaluate_model(e, [t], device="cpu")[t.name] for e, t in zip(experts, TASKS, strict=False)]
    for k in range(3):
        assert matrix[k][k] == report.expert_accuracy[k] == direct[k]["accuracy"]
        assert report.steps[k]["results"][TASKS[k].name]["top5_accuracy"] == direct[k]["top5_accuracy"]
    base = evaluate_model(tiny_base, TASKS, device="cpu")
    assert report.base_accuracy == [base[t.name]["accuracy"] for t in TASKS]
    # The experts are not interchangeable on these tasks, so the checks above can fail.
    assert len({json.dumps(d["per_class_accuracy"]) for d in direct}) > 1 or len({d["accuracy"] for d in direct}) > 1


def test_three_step_merge_accuracy_matrix_and_bwt(tiny_base, experts, tmp_path):
    out = tmp_path / "merged"
    evaluator = ContinualEvaluator(TASKS, limit=20, device="cpu", expert_names=["e0", "e1", "e2"])
    for step in (1, 2, 3):
        _save_model(out, tiny_base, _average(experts[:step]))
        evaluator(step, out, None)
    report = evaluator.report
    matrix = report.accuracy_matrix()
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert matrix[0][1] is None and matrix[0][2] is None and matrix[1][2] is None
    assert all(isinstance(matrix[t][i], float) and 0 <= matrix[t][i] <= 1 for t in range(3) for i in range(t + 1))
    # Row 3 is the final (3-expert average) model, scored independently here.
    final = evaluate_model(out, TASKS, limit=20, device="cpu")
    assert matrix[2] == [final[t.name]["accuracy"] for t in TASKS]
    bwt = ((matrix[2][0] - matrix[0][0]) + (matrix[2][1] - matrix[1][1])) / 2
    assert report.bwt == pytest.approx(bwt, abs=1e-12)
    assert report.average_accuracy == pytest.approx(sum(matrix[2]) / 3)
    per_step = [matrix[0][0], (matrix[1][0] + matrix[1][1]) / 2, sum(matrix[2]) / 3]
    assert report.average_accuracy_per_step() == pytest.approx(per_step)

    saved = json.loads((out / RESULTS_FILENAME).read_text())
    assert saved["schema_version"] == 1 and saved["tasks"] == [t.name for t in TASKS]
    assert saved["accuracy_matrix"] == matrix and saved["bwt"] == pytest.approx(bwt)
    assert saved["experts"] == ["e0", "e1", "e2"] and saved["limit"] == 20
    assert saved["base_accuracy"] is None and saved["expert_accuracy"] is None
    assert [s["step"] for s in saved["steps"]] == [1, 2, 3]
    assert saved["steps"][2]["results"]["colors-all"]["num_samples"] == 20
    again = EvaluationReport.from_json(out)
    assert again.to_dict() == report.to_dict()
    assert EvaluationReport.from_json(report.to_json()).bwt == report.bwt

    resumed = ContinualEvaluator.resume(out, TASKS, limit=20, device="cpu")
    assert resumed.report.num_steps == 3
    with pytest.raises(EvaluationError, match="do not start the given task list"):
        ContinualEvaluator.resume(out, list(reversed(TASKS)), device="cpu")


def test_report_edge_cases(tmp_path):
    report = EvaluationReport()
    assert report.average_accuracy is None and report.bwt is None and report.accuracy_matrix() == []
    report.add_step(1, {"a": {"accuracy": 0.5, "per_class_accuracy": [1.0, 0.0]}}, ["a"])
    assert report.bwt is None and report.average_accuracy == 0.5
    assert "per_class_accuracy" not in report.to_dict()["steps"][0]["results"]["a"]
    with pytest.raises(EvaluationError, match="out of order"):
        report.add_step(3, {}, [])
    (tmp_path / RESULTS_FILENAME).write_text('{"schema_version": 99}')
    with pytest.raises(EvaluationError, match="schema version 99"):
        EvaluationReport.from_json(tmp_path)
    with pytest.raises(EvaluationError, match="step 4 has no task"):
        ContinualEvaluator(TASKS[:1], device="cpu")(4, tmp_path)


def test_evaluator_reuses_heads_across_models(tiny_base, experts):
    evaluator = Evaluator(TASKS, limit=8, device="cpu")
    evaluator.evaluate(tiny_base)
    evaluator.evaluate(experts[0])
    assert evaluator.head_cache.misses == len(TASKS)  # experts change only the vision tower


def test_cli_eval_writes_json(tiny_base, tmp_path, capsys):
    output = tmp_path / "results.json"
    code = main(["eval", str(tiny_base), "--tasks", "synthetic/colors", "--limit", "16",
                 "--output", str(output), "--device", "cpu", "-q"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "synthetic/colors" in printed and "accuracy" in printed
    document = json.loads(output.read_text())
    assert document["limit"] == 16
    result = document["results"]["synthetic/colors"]
    assert result["num_samples"] == 16 and result["num_classes"] == 8
    direct = evaluate_model(tiny_base, ["synthetic/colors"], limit=16, device="cpu")["synthetic/colors"]
    assert result["accuracy"] == direct["accuracy"]
    assert main(["eval", str(tiny_base), "--tasks", "not-a-task"]) == 2
    assert main(["eval", str(tiny_base)]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'not-a-task'" in err


def test_engine_on_step_fills_the_report(tiny_base, experts, tmp_path):
    from hf_merge.merging.engine import ContinualMerger

    out = tmp_path / "engine-merge"
    evaluator = ContinualEvaluator(TASKS[:2], limit=16, device="cpu")
    merger = ContinualMerger(tiny_base, out, method="average", on_step=evaluator, device="cpu")
    merger.add_all(experts[:2])
    saved = EvaluationReport.from_json(out)
    assert saved.num_steps == 2 and saved.tasks == ["colors-all", "colors-bw"]
    assert (out / "merge_state.json").is_file()  # the report sits beside the merge, which is intact
    final = evaluate_model(out, TASKS[:2], limit=16, device="cpu")
    assert saved.accuracy_matrix()[1] == [final[t.name]["accuracy"] for t in TASKS[:2]]


def test_evaluate_model_accepts_a_clip_model_object(tiny_base):
    from transformers import CLIPModel, CLIPProcessor

    by_path = evaluate_model(tiny_base, ["synthetic/colors"], limit=16, device="cpu")
    model, processor = CLIPModel.from_pretrained(tiny_base), CLIPProcessor.from_pretrained(tiny_base)
    assert evaluate_model(model, ["synthetic/colors"], limit=16, processor=processor, device="cpu") == by_path
    assert evaluate_model(model, ["synthetic/colors"], limit=16, device="cpu") == by_path  # processor beside weights
    config = copy.deepcopy(model.config)
    config._name_or_path = ""  # built in memory: no folder to find a processor in
    with pytest.raises(EvaluationError, match="needs its processor"):
        evaluate_model(CLIPModel(config), ["synthetic/colors"], limit=16, device="cpu")
    with pytest.raises(EvaluationError, match="no tasks"):
        evaluate_model(tiny_base, [], device="cpu")
