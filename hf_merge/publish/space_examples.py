"""Example images for the Space: a few test images of every merged task, chosen when it is published.

A visitor should see the merged model at work on what it was merged for, so the examples are the
evaluated tasks' own test images (one per class, up to a few per task), each labelled with its task
and class, uploaded with the Space. A task whose data cannot be opened at publish time (offline, or
a dataset registered only in the merging session) is left out with one log line; with no task at
all, the Space keeps its generic shapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from hf_merge.log import get_logger

logger = get_logger(__name__)

EXAMPLES_DIR = "examples"
PER_TASK = 2
MAX_TASKS = 8
# Examples are shown as thumbnails; a large test image would only slow the Space's first load.
MAX_SIDE = 224
# Candidates looked at per task: enough to find PER_TASK different classes in most test splits.
_CANDIDATES = 64


@dataclass(frozen=True)
class SpaceExample:
    """One example image of the Space.

    Attributes:
        file: Path of the image inside the Space repo (``examples/<task>-<n>.png``).
        task: Registry name of the task it comes from (the dropdown entry it selects).
        label: Its true class name.
    """

    file: str
    task: str
    label: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def write_task_examples(task_names: list[str], out_dir: str | Path, *, per_task: int = PER_TASK) -> list[SpaceExample]:
    """Write up to ``per_task`` test images (of different classes) of each task into ``out_dir/examples``."""
    from hf_merge.evaluation import get_task
    from hf_merge.evaluation.datasets import load_task_data

    written: list[SpaceExample] = []
    folder = Path(out_dir) / EXAMPLES_DIR
    for task_name in list(dict.fromkeys(task_names))[:MAX_TASKS]:
        try:
            task = get_task(task_name)
            data = load_task_data(task, limit=_CANDIDATES)
            picks = _distinct_labels(data.labels, per_task)
            images = [data.images(i, i + 1)[0] for i in picks]
        except Exception as error:  # the Space still works without this task's examples
            why = str(error).splitlines()[0] if str(error) else type(error).__name__
            logger.info("No example images of task %s in the Space (%s)", task_name, why)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for n, (index, image) in enumerate(zip(picks, images, strict=False)):
            image = image.copy()
            image.thumbnail((MAX_SIDE, MAX_SIDE))
            name = f"{EXAMPLES_DIR}/{_slug(task_name)}-{n}.png"
            image.save(Path(out_dir) / name)
            written.append(SpaceExample(file=name, task=task.name, label=task.classes[data.labels[index]]))
    return written


def _distinct_labels(labels: list[int], count: int) -> list[int]:
    """Indices of the first ``count`` examples whose labels differ (fewer if the task has fewer)."""
    seen: set[int] = set()
    picks = []
    for index, label in enumerate(labels):
        if label not in seen:
            seen.add(label)
            picks.append(index)
            if len(picks) == count:
                break
    return picks


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-") or "task"
