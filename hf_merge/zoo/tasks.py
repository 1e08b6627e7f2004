"""The zoo's offline tasks in the evaluation registry: ``offline/<task>`` (test) and ``offline/<task>/val``."""

from __future__ import annotations

from hf_merge.zoo.data import TASKS

LOADER = "hf_merge.zoo.data:load_task"


def task_name(task: str, split: str = "test") -> str:
    """Registry name of one split of an offline task (the test split has the plain name)."""
    return f"offline/{task}" if split == "test" else f"offline/{task}/{split}"


def offline_task(task: str, split: str = "test"):
    """The evaluation :class:`~hf_merge.evaluation.Task` for one split of an offline task."""
    from hf_merge.evaluation import DatasetSpec, Task

    info = TASKS[task]
    spec = DatasetSpec(kind="python", path=LOADER, options={"name": task, "split": split})
    return Task(name=task_name(task, split), classes=info.classnames, templates=info.templates, dataset=spec)


def register_offline_tasks() -> list[str]:
    """Register the val and test splits of every offline task; returns the registered names."""
    from hf_merge.evaluation import register_task

    names = []
    for task in TASKS:
        for split in ("val", "test"):
            names.append(register_task(offline_task(task, split), overwrite=True).name)
    return names
