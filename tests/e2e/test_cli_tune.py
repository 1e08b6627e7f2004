"""``--tune`` from the command line: the scaling chosen at every step on validation images, recorded in
``merge_state.json`` and the card, continued by ``add`` and by the watcher (whose gate reuses the scores);
bad input refused in one line before any download."""

from __future__ import annotations

import json

import pytest
import yaml
from _cli import EVAL_LIMIT, TASK, error_lines, hf_merge
from huggingface_hub import ModelCard, hf_hub_download

from hf_merge.cli import main
from hf_merge.evaluation import evaluate_model
from hf_merge.merging.engine import merge_weights
from hf_merge.merging.methods import get_method

REPO = "alice/cli-tuned"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tuned(seeded_hub, alice_token, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-tune")
    run = hf_merge(
        ["merge", "--base", seeded_hub.base, "--experts", *seeded_hub.experts[:3], "--method", "task_arithmetic",
         "--tune", "--eval", *[TASK] * 3, "--eval-every-step", "--eval-limit", EVAL_LIMIT,
         "--output", str(root / "out"), "--push-to-hub", REPO, "--token", alice_token]
    )
    assert run.returncode == 0, run.stderr
    return root, run


def test_every_step_records_the_grid_the_scores_and_the_best_value(tuned):
    root, _ = tuned
    state = json.loads(open(hf_hub_download(REPO, "merge_state.json")).read())
    grid = list(get_method("task_arithmetic").parameter("scaling_factor").tune_grid)
    records = state["tuning"]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["parameter"] == "scaling_factor" and record["grid"] == grid
        assert len(record["scores"]) == len(grid) and all(0 <= s <= 1 for s in record["scores"])
        best = max(record["scores"])
        assert record["chosen"] == grid[record["scores"].index(best)]  # the first of the best
        assert all(list(scores) == ["synthetic/colors/val"] for scores in record["per_task"])  # never the test split
    assert state["hyperparameters"]["scaling_factor"] == records[-1]["chosen"]
    recipe = yaml.safe_load(open(hf_hub_download(REPO, "recipe.yaml")).read())
    assert recipe["tune"] is True


def test_the_recorded_scores_are_the_validation_accuracy_of_each_candidate(tuned, seeded_hub, tmp_path):
    """Step 1's candidates are θ0 + λ·τ1: merged here independently and scored on the validation task."""
    root, _ = tuned
    record = json.loads((root / "out" / "merge_state.json").read_text())["tuning"][0]
    base, expert = seeded_hub.base_dir, seeded_hub.expert_dirs[0]
    for value, score in list(zip(record["grid"], record["scores"], strict=True))[:2]:
        out = tmp_path / f"lambda-{value}"
        merge_weights(base, [expert], "task_arithmetic", out, device="cpu", scaling_factor=value)
        accuracy = evaluate_model(out, ["synthetic/colors/val"], limit=int(EVAL_LIMIT), device="cpu")
        assert accuracy["synthetic/colors/val"]["accuracy"] == pytest.approx(score, abs=1e-12)


def test_the_card_shows_the_choice_per_step(tuned):
    root, _ = tuned
    text = ModelCard.load(root / "out" / "README.md").text
    assert "### Hyperparameters chosen on validation data" in text
    assert "validation tasks: synthetic/colors/val" in text
    records = json.loads((root / "out" / "merge_state.json").read_text())["tuning"]
    for record in records:
        chosen = f"**{100 * record['scores'][record['grid'].index(record['chosen'])]:.1f}**"
        row = next(line for line in text.splitlines() if line.startswith(f"| {record['step']} | "))
        assert chosen in row and row.endswith(f"| {record['chosen']:g} |")


def test_add_goes_on_tuning_from_the_value_kept(tuned, seeded_hub, alice_token, tmp_path):
    run = hf_merge(["add", REPO, "--experts", seeded_hub.experts[3], "--eval", TASK, "--output", str(tmp_path / "more"),
                    "--token", alice_token])
    assert run.returncode == 0, run.stderr
    records = json.loads((tmp_path / "more" / "merge_state.json").read_text())["tuning"]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


# -- bad input: one line, exit 2, before any download --------------------------------------------------
def _refused(args, capsys, tmp_path):
    code = main(["merge", *args, "--output", str(tmp_path / "out"), "-q"])
    (line,) = error_lines(capsys.readouterr().err)
    assert code == 2
    assert not (tmp_path / "out").exists()
    return line


def test_tune_without_evaluation_tasks(seeded_hub, capsys, tmp_path):
    line = _refused(["--base", seeded_hub.base, "--experts", *seeded_hub.experts[:2], "--tune"], capsys, tmp_path)
    assert "--tune scores each candidate on the validation data of the evaluation tasks: name them with --eval" in line


def test_tune_with_a_task_without_validation_data(seeded_hub, capsys, tmp_path):
    from PIL import Image

    folder = tmp_path / "my-photos"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / label / "a.png")
    line = _refused(["--base", seeded_hub.base, "--experts", *seeded_hub.experts[:2], "--tune",
                     "--eval", str(folder)], capsys, tmp_path)
    assert "--tune: task my-photos has no validation split" in line


def test_tune_with_a_method_that_has_nothing_to_tune(seeded_hub, capsys, tmp_path):
    line = _refused(["--base", seeded_hub.base, "--experts", *seeded_hub.experts[:2], "--method", "dop", "--tune",
                     "--eval", TASK, TASK], capsys, tmp_path)
    assert "method 'dop' has no hyperparameter to tune; drop --tune or use one of:" in line
