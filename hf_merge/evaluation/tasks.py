"""Classification tasks: a dataset, class names in label order, and CLIP prompt templates.

A :class:`Task` is pure data; :mod:`hf_merge.evaluation.datasets` turns its :class:`DatasetSpec`
into images and labels. Three kinds of dataset are supported:

- ``"hub"``: a dataset loaded with ``datasets.load_dataset(path, config, split=...)``; ``path`` is
  a Hub dataset id or a local dataset folder; ``image_column`` and ``label_column`` name the columns.
- ``"imagefolder"``: a local folder with one sub-folder of images per class. Sub-folders named
  after the classes are matched by name; otherwise the sorted sub-folders are labels 0, 1, ...
- ``"python"``: ``"package.module:function"``, called with ``options`` as keyword arguments, that
  returns ``(images, labels)``: a list of PIL images (or a uint8 array of shape ``(N, H, W)`` or
  ``(N, H, W, C)``) and a list of int labels.

The registry holds the 20 tasks of the published continual-merging experiments (see
:mod:`hf_merge.evaluation.paper_tasks`), ``synthetic/colors``, a generated task that needs no
download, and the tasks of installed plugins (entry-point group ``hf_merge.tasks``, e.g. the
offline zoo's ``offline/<task>``). Other tasks are added with :func:`register_task`. Names are matched without regard to
case, ``-`` or ``_`` (``stanford_cars`` finds ``stanford-cars``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from hf_merge.errors import EvaluationError

DatasetKind = Literal["hub", "imagefolder", "python"]
_KINDS = ("hub", "imagefolder", "python")
_PLACEHOLDERS = ("{c}", "{}")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a task's labelled images come from.

    Attributes:
        kind: ``"hub"``, ``"imagefolder"`` or ``"python"`` (see the module docstring).
        path: Hub dataset id or local dataset folder (hub), image folder (imagefolder), or
            ``"module:function"`` (python).
        split: Split to evaluate on (hub only).
        config: Dataset configuration name, e.g. ``"cropped_digits"`` for SVHN (hub only).
        image_column: Column holding the images (hub only).
        label_column: Column holding the integer labels (hub only).
        revision: Dataset revision (hub only).
        options: Keyword arguments for the function (python only).
        holdout_fraction: When set, only a seeded random ``holdout_fraction`` of ``split`` is used:
            a validation set carved out of the train split (hub only; see
            :mod:`hf_merge.evaluation.validation`).
        holdout_seed: Seed of the permutation that picks the held-out examples.
    """

    kind: DatasetKind
    path: str
    split: str = "test"
    config: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    revision: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    holdout_fraction: float | None = None
    holdout_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise EvaluationError(f"unknown dataset kind {self.kind!r}; use one of {', '.join(_KINDS)}")
        if self.kind == "python" and ":" not in self.path:
            raise EvaluationError(f"python dataset {self.path!r} must be written 'module:function'")
        if self.holdout_fraction is not None:
            fraction = self.holdout_fraction
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
                raise EvaluationError(f"holdout_fraction must be a number between 0 and 1 (exclusive), got {fraction!r}")
            # Only the hub loader selects a holdout; elsewhere the fraction would be silently ignored.
            if self.kind != "hub":
                raise EvaluationError(f"holdout_fraction is supported for hub datasets only, not {self.kind} {self.path}")
        if isinstance(self.holdout_seed, bool) or not isinstance(self.holdout_seed, int):
            raise EvaluationError(f"holdout_seed must be an integer, got {self.holdout_seed!r}")

    def describe(self) -> str:
        """Short human description, e.g. ``tanganke/sun397 (test)`` or
        ``tanganke/sun397 (train, held-out 10 % seed 0)``."""
        if self.kind == "hub":
            config = f"/{self.config}" if self.config else ""
            holdout = ""
            if self.holdout_fraction is not None:
                holdout = f", held-out {self.holdout_fraction * 100:g} % seed {self.holdout_seed}"
            return f"{self.path}{config} ({self.split}{holdout})"
        return f"{self.kind} {self.path}"


@dataclass(frozen=True)
class Task:
    """A zero-shot classification task.

    Attributes:
        name: Registry name, e.g. ``"sun397"``; used as the key of every result.
        classes: Class names; position ``i`` is the name of label ``i``.
        templates: Prompt templates; ``{}`` (or ``{c}``) is replaced by a class name.
        dataset: Where the test images come from; ``None`` for a task known only by its head.
    """

    name: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    dataset: DatasetSpec | None = None

    def __post_init__(self) -> None:
        # Accept lists from callers, store tuples so a Task stays immutable.
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "templates", tuple(self.templates))
        if not self.name:
            raise EvaluationError("a task needs a non-empty name")
        if not self.classes:
            raise EvaluationError(f"task {self.name}: no class names")
        if any(not isinstance(c, str) or not c.strip() for c in self.classes):
            raise EvaluationError(f"task {self.name}: class names must be non-empty strings")
        duplicates = sorted({c for c in self.classes if self.classes.count(c) > 1})
        if duplicates:
            raise EvaluationError(f"task {self.name}: duplicate class names {duplicates[:5]}")
        if not self.templates:
            raise EvaluationError(f"task {self.name}: no prompt templates")
        for template in self.templates:
            if not any(p in template for p in _PLACEHOLDERS):
                raise EvaluationError(
                    f"task {self.name}: template {template!r} has no '{{}}' placeholder for the class name"
                )

    @property
    def num_classes(self) -> int:
        """Number of classes (labels run from 0 to ``num_classes - 1``)."""
        return len(self.classes)

    def prompts(self, class_name: str) -> list[str]:
        """Every template filled in with ``class_name``."""
        return [render_template(t, class_name) for t in self.templates]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the dataset as a nested dict)."""
        data = asdict(self)
        data["classes"], data["templates"] = list(self.classes), list(self.templates)
        return data

    @classmethod
    def from_image_folder(
        cls, path: str | Path, *, name: str | None = None, templates: tuple[str, ...] = ("a photo of a {}.",)
    ) -> Task:
        """A task whose classes are the sub-folders of ``path`` (sorted), e.g. for ``hf-merge eval``."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise EvaluationError(f"image folder {folder} does not exist")
        classes = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
        if not classes:
            raise EvaluationError(f"image folder {folder}: no class sub-folders")
        return cls(
            name=name or folder.resolve().name,
            classes=classes,
            templates=templates,
            dataset=DatasetSpec(kind="imagefolder", path=str(folder.resolve())),
        )


def render_template(template: str, class_name: str) -> str:
    """Fill a template; only the placeholder is replaced, so braces in class names are safe."""
    if "{c}" in template:
        return template.replace("{c}", class_name)
    return template.replace("{}", class_name)


_REGISTRY: dict[str, Task] = {}
_BUILTINS_LOADED = False


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Add ``task`` to the registry under ``task.name``; an existing name needs ``overwrite=True``."""
    _load_builtins()
    key = _key(task.name)
    if key in _REGISTRY and not overwrite and _REGISTRY[key] != task:
        raise EvaluationError(f"task {task.name} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = task
    return task


def get_task(task: str | Task) -> Task:
    """Look a task up by name (a :class:`Task` is returned as is; an existing folder becomes an
    image-folder task)."""
    if isinstance(task, Task):
        return task
    _load_builtins()
    found = _REGISTRY.get(_key(task))
    if found is not None:
        return found
    derived = _derived_validation_task(task)
    if derived is not None:
        return derived
    if Path(task).expanduser().is_dir():
        return Task.from_image_folder(task)
    raise EvaluationError(f"unknown task {task!r}; known tasks: {', '.join(list_tasks())}")


def registered_task(name: str) -> Task | None:
    """The registered task called ``name`` (matched as :func:`get_task` matches), else ``None``;
    unlike :func:`get_task`, a folder of that name is not turned into a task."""
    _load_builtins()
    return _REGISTRY.get(_key(name))


VALIDATION_SUFFIX = "/val"
HOLDOUT_FRACTION = 0.1  # FusionBench's validation_fraction
HOLDOUT_SEED = 0  # FusionBench's random_seed


def held_out_validation_task(task: Task) -> Task:
    """``<task>/val`` of a Hub dataset task: FusionBench's validation split, a seeded 10 % of the
    dataset's *train* split (see :func:`hf_merge.evaluation.validation.holdout_indices`).

    Raises:
        EvaluationError: ``task`` is tested on its train split: a part held out of it would be test data.
    """
    spec, name = task.dataset, task.name
    assert spec is not None and spec.kind == "hub", "only a Hub dataset task has a held-out train split"
    if "train" in {part.split("[")[0].strip().lower() for part in spec.split.split("+")}:
        raise EvaluationError(
            f"task {name} is evaluated on the train split of {spec.describe()}, so a held-out part of it is not "
            f"separate from its test data: register a '{name}{VALIDATION_SUFFIX}' task (hf_merge.evaluation.register_task)"
        )
    holdout = replace(spec, split="train", holdout_fraction=HOLDOUT_FRACTION, holdout_seed=HOLDOUT_SEED)
    return Task(name + VALIDATION_SUFFIX, task.classes, task.templates, holdout)


def _derived_validation_task(name: str) -> Task | None:
    """``<task>/val`` of a registered Hub dataset task (:func:`held_out_validation_task`), so the
    name works wherever a task name does."""
    key = _key(name)
    if not key.endswith(VALIDATION_SUFFIX):
        return None
    test = _REGISTRY.get(key[: -len(VALIDATION_SUFFIX)])
    if test is None or test.dataset is None or test.dataset.kind != "hub":
        return None
    return held_out_validation_task(test)


def list_tasks() -> list[str]:
    """Names of every registered task, in registration order."""
    _load_builtins()
    return [t.name for t in _REGISTRY.values()]


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from hf_merge.evaluation.paper_tasks import paper_tasks
    from hf_merge.evaluation.synthetic import COLOR_NAMES

    for name, entry in paper_tasks().items():
        spec = DatasetSpec(
            kind="hub",
            path=entry["dataset"],
            split=entry["split"],
            config=entry.get("config"),
            image_column=entry.get("image_column", "image"),
            label_column=entry.get("label_column", "label"),
        )
        _REGISTRY[_key(name)] = Task(name, tuple(entry["classes"]), tuple(entry["templates"]), spec)
    colors = Task(
        "synthetic/colors",
        classes=COLOR_NAMES,
        templates=("a photo of a {} square.", "a {} image.", "the colour {}."),
        dataset=DatasetSpec(kind="python", path="hf_merge.evaluation.synthetic:solid_colors"),
    )
    _REGISTRY[_key(colors.name)] = colors
    # Its validation split: other images of the same colours (another seed), for ``--tune``.
    colors_val = Task(f"{colors.name}/val", colors.classes, colors.templates,
                      DatasetSpec(kind="python", path="hf_merge.evaluation.synthetic:solid_colors", options={"seed": 1}))
    _REGISTRY[_key(colors_val.name)] = colors_val
    _load_plugins()


# Packages add tasks through this entry-point group: each entry is a function that registers its
# tasks with register_task. The offline zoo's tasks (``offline/mnist``, ...) come this way, so that
# ``hf-merge merge --eval offline/mnist`` works in a fresh process without evaluation importing the zoo.
TASK_PLUGIN_GROUP = "hf_merge.tasks"


def _load_plugins() -> None:
    from importlib.metadata import entry_points

    from hf_merge.log import get_logger

    for entry in entry_points(group=TASK_PLUGIN_GROUP):
        try:
            entry.load()()
        except Exception as error:  # one broken plugin must not hide the built-in tasks
            get_logger(__name__).warning("task plugin %s failed to load: %s", entry.name, error)
