"""Task registry: the 20 tasks of the published experiments, validation, lookup and registration."""

from __future__ import annotations

import pytest

from hf_merge.errors import EvaluationError
from hf_merge.evaluation import (
    PAPER_TASKS_8,
    PAPER_TASKS_14,
    PAPER_TASKS_20,
    DatasetSpec,
    Task,
    get_task,
    list_tasks,
)
from hf_merge.evaluation.tasks import register_task, render_template

EXPECTED_CLASSES = {
    "sun397": 397, "stanford-cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43,
    "mnist": 10, "dtd": 47, "oxford_flowers102": 102, "pcam": 2, "fer2013": 7, "oxford-iiit-pet": 37,
    "stl10": 10, "cifar100": 100, "cifar10": 10, "food101": 101, "fashion_mnist": 10,
    "emnist_letters": 26, "kmnist": 10, "rendered-sst2": 2,
}


def test_paper_sequences_are_the_published_order():
    assert PAPER_TASKS_8 == ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
    assert PAPER_TASKS_14[:8] == PAPER_TASKS_8 and len(PAPER_TASKS_14) == 14
    assert PAPER_TASKS_20[:14] == PAPER_TASKS_14 and len(PAPER_TASKS_20) == 20
    assert list(PAPER_TASKS_20) == list(EXPECTED_CLASSES)
    assert len(set(PAPER_TASKS_20)) == 20


@pytest.mark.parametrize("name", PAPER_TASKS_20)
def test_paper_task_is_consistent(name):
    task = get_task(name)
    assert task.name == name
    assert task.num_classes == EXPECTED_CLASSES[name]
    assert len(set(task.classes)) == task.num_classes
    assert all(c == c.strip() and c for c in task.classes)
    assert task.templates and len(set(task.templates)) == len(task.templates)
    for template in task.templates:
        assert template.count("{}") + template.count("{c}") == 1, template
        assert "{" not in template.replace("{}", "").replace("{c}", "")
    prompts = task.prompts(task.classes[-1])
    assert len(prompts) == len(task.templates) and all(task.classes[-1] in p for p in prompts)
    spec = task.dataset
    assert spec is not None and spec.kind == "hub"
    assert spec.path.count("/") == 1 and spec.split in {"test", "validation"}
    assert spec.image_column and spec.label_column


def test_paper_task_datasets_and_known_names():
    datasets = {name: get_task(name).dataset for name in PAPER_TASKS_20}
    assert datasets["sun397"].path == "tanganke/sun397"
    assert datasets["stanford-cars"].path == "tanganke/stanford_cars"
    assert (datasets["svhn"].path, datasets["svhn"].config) == ("ufldl-stanford/svhn", "cropped_digits")
    assert datasets["mnist"].path == "ylecun/mnist"
    assert datasets["food101"].split == "validation"  # Food-101 has no test split on the Hub
    assert (datasets["fer2013"].image_column, datasets["fer2013"].label_column) == ("jpg", "cls")
    assert get_task("mnist").classes == tuple(str(d) for d in range(10))
    assert get_task("emnist_letters").classes[0] == "A" and get_task("emnist_letters").classes[-1] == "Z"
    assert get_task("cifar100").classes[26] == "crab"
    assert get_task("sun397").classes[:2] == ("abbey", "airplane cabin")
    assert get_task("stanford-cars").classes[-1] == "smart fortwo Convertible 2012"
    assert get_task("gtsrb").prompts("stop")[0] == 'a zoomed in photo of a "stop" traffic sign.'
    assert len(get_task("resisc45").templates) == 18 and len(get_task("cifar10").templates) == 18


def test_lookup_ignores_case_dash_and_underscore():
    assert get_task("Stanford_Cars") is get_task("stanford-cars")
    assert get_task("oxford-flowers102") is get_task("oxford_flowers102")
    assert get_task("rendered_sst2").name == "rendered-sst2"
    assert "synthetic/colors" in list_tasks() and len(list_tasks()) >= 21


def test_unknown_task_is_one_line_error():
    with pytest.raises(EvaluationError) as info:
        get_task("no-such-task")
    assert "no-such-task" in str(info.value) and "\n" not in str(info.value)


def test_task_validation_errors_name_the_task():
    with pytest.raises(EvaluationError, match="task t: duplicate class names"):
        Task("t", ("a", "a"), ("a {}.",))
    with pytest.raises(EvaluationError, match="task t: template 'a photo.' has no"):
        Task("t", ("a", "b"), ("a photo.",))
    with pytest.raises(EvaluationError, match="task t: no class names"):
        Task("t", (), ("{}",))
    with pytest.raises(EvaluationError, match="unknown dataset kind"):
        DatasetSpec(kind="ftp", path="x")
    with pytest.raises(EvaluationError, match="module:function"):
        DatasetSpec(kind="python", path="no_colon")


def test_render_template_supports_both_placeholders_and_braces_in_names():
    assert render_template("a photo of a {c}.", "x{y}") == "a photo of a x{y}."
    assert render_template('the number: "{}".', "7") == 'the number: "7".'


def test_register_task_and_overwrite():
    task = Task("test-registry/custom", ("left", "right"), ("a {} arrow.",),
                DatasetSpec(kind="python", path="hf_merge.evaluation.synthetic:solid_colors"))
    assert register_task(task) is task
    assert get_task("TEST-REGISTRY/CUSTOM") is task
    register_task(task)  # same task again: fine
    other = Task("test-registry/custom", ("up", "down"), ("a {} arrow.",))
    with pytest.raises(EvaluationError, match="already registered"):
        register_task(other)
    register_task(other, overwrite=True)
    assert get_task("test-registry/custom").classes == ("up", "down")


def test_image_folder_becomes_a_task(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
    task = get_task(str(tmp_path / "pets"))
    assert task.name == "pets" and task.classes == ("cat", "dog") and task.dataset.kind == "imagefolder"
    assert task.to_dict()["dataset"]["kind"] == "imagefolder"


def test_cli_task_sets_expand_to_the_paper_sequences():
    from hf_merge.cli.evaluate import expand_task_sets

    assert expand_task_sets(["paper-8"]) == list(PAPER_TASKS_8)
    assert expand_task_sets(["PAPER_20"]) == list(PAPER_TASKS_20)
    assert expand_task_sets(["mnist,svhn", "synthetic/colors"]) == ["mnist", "svhn", "synthetic/colors"]
