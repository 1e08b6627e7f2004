"""The merge recipe: one typed description of a merge, whether it came from CLI flags, YAML or Python.

A recipe is a pydantic model validated before anything is downloaded: an unknown key, a typo in a
method parameter, the base listed as an expert or an expert listed twice is a
:class:`~hf_merge.errors.RecipeError` naming the culprit (and, for typos, the closest valid
spelling; :mod:`hf_merge.declared` words pydantic's errors). A method's parameters are checked
against the method's own declarations (:class:`~hf_merge.merging.methods.base.Parameter`). The
YAML form is what the merged repo carries as ``recipe.yaml``, so a merge can be read, reproduced
and continued from the Hub. Other packages add sections of their own (the watcher's ``watch:``)
with :func:`hf_merge.recipe_sections.register_section`, so the recipe never imports them.

Example ``recipe.yaml``::

    base: openai/clip-vit-base-patch32
    experts:
      - tanganke/clip-vit-base-patch32_sun397
      - tanganke/clip-vit-base-patch32_stanford-cars@main
    method: opcm
    parameters:
      alpha: 0.5
    eval:
      tasks: [sun397, stanford-cars]
      every_step: true
    push_to_hub: my-user/clip-vit-b32-opcm
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

from hf_merge.declared import POSITIVE_INTEGER, excerpt, one_line, suggest, unknown_key
from hf_merge.errors import RecipeError
from hf_merge.hub.repo_ids import repo_id_problem
from hf_merge.hub.sources import split_reference
from hf_merge.io.merge_folder import RECIPE_FILENAME, MergeFolder
from hf_merge.io.yaml_file import load_yaml, read_yaml
from hf_merge.recipe_parameters import checked_parameters, known_methods, method_parameters
from hf_merge.recipe_sections import sections as _sections

SCOPES = ("vision", "text", "all")
__all__ = ["SCOPES", "EvalSpec", "MergeRecipe", "known_methods", "method_parameters", "reference_key"]

_CONFIG = ConfigDict(extra="forbid", validate_default=False, arbitrary_types_allowed=True)


#: Precisions an evaluation may run in (float32, the default, keeps figures comparable to the papers').
EVAL_DTYPES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------ models
class EvalSpec(BaseModel):
    """What to evaluate and when.

    Attributes:
        tasks: Names of registered evaluation tasks (``hf_merge.evaluation.get_task``).
        every_step: Evaluate after every merge step on the tasks seen so far (the continual protocol);
            otherwise only the final model is evaluated.
        limit: Evaluate on at most this many examples per task (quick checks).
        dtype: Dtype of the evaluation's forward pass: ``float32`` (the paper's), ``bfloat16`` or ``float16``.
        fast_preprocessing: Preprocess with transformers' torchvision image processor, not the PIL one
            the reference evaluation uses.
    """

    model_config = _CONFIG

    tasks: list[str] = Field(default_factory=list)
    every_step: StrictBool = False
    limit: StrictInt | None = Field(default=None, ge=1, json_schema_extra=POSITIVE_INTEGER)

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_list(cls, value: Any) -> Any:
        return _as_list(value) if isinstance(value, (str, list, tuple)) else value
    dtype: str = "float32"
    fast_preprocessing: StrictBool = False

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in EVAL_DTYPES:
            raise ValueError(f"must be one of {', '.join(EVAL_DTYPES)}, got {value!r}")
        return value

    def to_dict(self) -> dict[str, Any]:
        """Plain data in the YAML layout."""
        data: dict[str, Any] = {"tasks": list(self.tasks), "every_step": self.every_step}
        if self.limit is not None:
            data["limit"] = self.limit
        if self.dtype != "float32":
            data["dtype"] = self.dtype
        if self.fast_preprocessing:
            data["fast_preprocessing"] = True
        return data


class MergeRecipe(BaseModel):
    """A validated description of a continual merge.

    Attributes:
        base: The pretrained model θ0: ``REPO[@REV]`` or a local folder.
        experts: Fine-tuned models, merged in this order (``REPO[@REV]`` or folders).
        method: A registered merge method (``opcm``, ``average``, ``task_arithmetic``, ``ties``, ``magmax``).
        parameters: The method's hyperparameters that the recipe sets; unset ones take the method's defaults.
        scope: Which tower is merged: ``vision`` (tower + visual projection), ``text`` or ``all``.
        eval: Evaluation settings, or ``None`` to skip evaluation.
        output: Local output folder (defaults to the repo name of ``push_to_hub``, else ``merged-<method>``).
        push_to_hub: Repo id to publish the merged model to, or ``None``.
        private: Create the repo private.
        space: Space id of a Gradio demo to publish for the merged model, or ``None``.
        seed: Seed of the shuffle (and of anything random downstream).
        shuffle: Merge the experts in a seeded random order instead of the listed one.
        allow_pickle: Accept ``.bin`` checkpoints (loaded with ``torch.load(weights_only=True)``).
        evict: Delete each expert's snapshot from the local cache once merged (flat disk use).
        partial_download: Download only the experts' tensors in ``scope`` (HTTP ranges), not whole
            snapshots, where the server allows it.
        tune: Choose the method's tuned hyperparameter (its declared ``tune_grid``) at every step
            by the validation accuracy of each candidate merge on the ``eval`` tasks (``--tune``).
        checkpoint_every: Write the output folder after every N-th step (the last step is always
            written; a crash resumes from the last written one). ``None``: the method's default
            (OPCM, TIES, MagMax 1; average and task arithmetic more, see the README's benchmark).
            Evaluating every step needs 1.
        sections: Sections registered by other packages (:func:`~hf_merge.recipe_sections.register_section`), by key; each
            is also an attribute (``recipe.watch``).
    """

    model_config = _CONFIG

    base: str
    experts: list[str]
    method: str = "opcm"
    parameters: dict[str, Any] = Field(default_factory=dict)
    scope: str = "vision"
    eval: EvalSpec | None = None
    output: str | None = None
    push_to_hub: str | None = None
    private: StrictBool = False
    space: str | None = None
    seed: StrictInt | None = None
    shuffle: StrictBool = False
    allow_pickle: StrictBool = False
    evict: StrictBool = False
    partial_download: StrictBool = True
    checkpoint_every: StrictInt | None = Field(default=None, ge=1, json_schema_extra=POSITIVE_INTEGER)
    tune: StrictBool = False
    sections: dict[str, Any] = Field(default_factory=dict)

    def __init__(self, **data: Any) -> None:
        source = str(data.pop("_source", "recipe"))
        for name in list(data):
            if name in _sections():
                data.setdefault("sections", {})[name] = data.pop(name)
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise one_line(error, type(self), source=source, extra_keys=_sections()) from None
        for name, value in list(self.sections.items()):
            if name not in _sections():
                raise unknown_key(name, [*type(self).model_fields, *_sections()], source=source)
            self.sections[name] = _sections()[name].parse(value, source)

    def __getattr__(self, name: str) -> Any:
        # Registered sections read as attributes: ``recipe.watch``.
        if name in _sections():
            return (self.__dict__.get("sections") or {}).get(name)
        return super().__getattr__(name)  # type: ignore[misc]

    # ------------------------------------------------------------------ validation
    @field_validator("base", mode="before")
    @classmethod
    def _base(cls, value: Any) -> str:
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise ValueError("the recipe needs a base model: `base: REPO[@REV]` or a local folder")
        return str(value)

    @field_validator("experts", mode="before")
    @classmethod
    def _experts(cls, value: Any) -> list[str]:
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError("the recipe needs at least one expert: `experts: [REPO[@REV], ...]`")
        if any(not isinstance(e, (str, Path)) or not str(e).strip() for e in value):
            raise ValueError("an expert reference is empty or not a string")
        return [str(e) for e in value]

    @field_validator("output", mode="before")
    @classmethod
    def _output(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str) -> str:
        if value not in SCOPES:
            raise ValueError(f"unknown scope {excerpt(value)}{suggest(value, SCOPES)}; choose from {', '.join(SCOPES)}")
        return value

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_shorthand(cls, value: Any) -> Any:
        # `eval: sun397, dtd` or `eval: [sun397, dtd]`: the tasks alone.
        return {"tasks": value} if isinstance(value, (str, list, tuple)) else value

    @field_validator("push_to_hub", "space")
    @classmethod
    def _repo_id(cls, value: str | None, info: Any) -> str | None:
        if value is not None and repo_id_problem(value) is not None:
            raise ValueError(f"`{info.field_name}` must be a repo id `USER/NAME`, got {excerpt(value)} "
                             f"({repo_id_problem(value)})")
        return value

    @field_validator("parameters", mode="before")
    @classmethod
    def _no_parameters(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _across_fields(self) -> MergeRecipe:
        base_key = reference_key(self.base)
        seen: dict[tuple[str, str | None], str] = {}
        for expert in self.experts:
            key = reference_key(expert)
            if key[0] == base_key[0] and (key == base_key or key[1] is None or base_key[1] is None):
                raise ValueError(f"the base model {self.base!r} is also listed as an expert ({expert!r}); remove it from the experts")
            if key in seen:
                raise ValueError(f"expert {expert!r} is listed twice (also as {seen[key]!r}); each expert is merged once")
            seen[key] = expert
        self.parameters = checked_parameters(self.method, self.parameters)
        if self.eval is not None and not self.eval.tasks:
            raise ValueError("`eval` needs at least one task: `eval: {tasks: [...]}`")
        every = self.checkpoint_every
        if every is not None and every > 1 and self.eval is not None and self.eval.every_step:
            raise ValueError("`eval.every_step` evaluates the written model after each step, so it needs `checkpoint_every: 1`")
        return self

    # ------------------------------------------------------------------ derived values
    def ordered_experts(self) -> list[str]:
        """The experts in merge order: as listed, or shuffled with ``seed`` when ``shuffle`` is set."""
        return [self.experts[i] for i in self._order()]

    def ordered_eval_tasks(self) -> list[str]:
        """Evaluation tasks in merge order: with one task per expert, the shuffle moves them together."""
        if self.eval is None:
            return []
        tasks = list(self.eval.tasks)
        if len(tasks) != len(self.experts):
            return tasks
        return [tasks[i] for i in self._order()]

    def _order(self) -> list[int]:
        order = list(range(len(self.experts)))
        if self.shuffle:
            random.Random(self.seed).shuffle(order)
        return order

    def hyperparameters(self) -> dict[str, Any]:
        """The method's full hyperparameters: declared defaults overridden by the recipe's values."""
        merged = method_parameters(self.method)
        merged.update(self.parameters)
        return {k: v for k, v in merged.items() if v is not None}

    def output_dir(self) -> Path:
        """Where the merge result is written."""
        if self.output:
            return Path(self.output).expanduser()
        if self.push_to_hub:
            return Path(self.push_to_hub.split("/")[-1])
        return Path(f"merged-{self.method}")

    def replace(self, **changes: Any) -> MergeRecipe:
        """A validated copy with ``changes`` applied (``None`` clears an optional field)."""
        data = self.to_dict()
        for name, value in changes.items():
            if value is None:
                data.pop(name, None)
            else:
                data[name] = value
        return MergeRecipe.from_dict(data, source="recipe")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain data in the YAML layout; unset optional fields are left out."""
        data: dict[str, Any] = {"base": self.base, "experts": list(self.experts), "method": self.method}
        if self.parameters:
            data["parameters"] = dict(self.parameters)
        if self.scope != "vision":
            data["scope"] = self.scope
        if self.eval is not None:
            data["eval"] = self.eval.to_dict()
        for name in ("output", "push_to_hub", "space", "seed", "checkpoint_every"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        for name in ("private", "shuffle", "allow_pickle", "evict", "tune"):
            if getattr(self, name):
                data[name] = True
        if not self.partial_download:
            data["partial_download"] = False
        for name, value in self.sections.items():
            if value is not None:
                data[name] = _sections()[name].dump(value)
        return data

    def to_yaml(self) -> str:
        """The recipe as YAML (what ``recipe.yaml`` holds)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, folder: str | Path) -> Path:
        """Write the recipe into merge folder ``folder`` (its ``recipe.yaml``)."""
        return MergeFolder(folder).write_recipe_text(self.to_yaml())

    @classmethod
    def of_folder(cls, folder: str | Path) -> MergeRecipe | None:
        """The recipe a merge folder carries, or ``None`` when it has none."""
        merge_folder = MergeFolder(folder)
        data = merge_folder.recipe_data()
        return None if data is None else cls.from_dict(data or {}, source=RECIPE_FILENAME)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "recipe") -> MergeRecipe:
        """Build and validate a recipe from plain data; unknown keys are errors with a suggestion."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source} must be a mapping of recipe fields, got {type(data).__name__}")
        valid = [name for name in cls.model_fields if name != "sections"] + list(_sections())
        for key in data:
            if key not in valid:
                raise unknown_key(str(key), valid, source=source)
        for required in ("base", "experts"):
            if data.get(required) in (None, "", []):
                raise RecipeError(f"{source} is missing `{required}`")
        return cls(**{str(k): v for k, v in data.items()}, _source=source)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "recipe") -> MergeRecipe:
        """Parse a YAML recipe (capped in size, aliases refused: :mod:`hf_merge.io.yaml_file`)."""
        return cls.from_dict(load_yaml(text, source=source) or {}, source=source)

    @classmethod
    def load(cls, path: str | Path) -> MergeRecipe:
        """Read a YAML recipe file (or the recipe of a merge folder)."""
        path = Path(path)
        if path.is_dir():
            recipe = cls.of_folder(path)
            if recipe is None:
                raise RecipeError(f"{str(path)!r} holds no {RECIPE_FILENAME}")
            return recipe
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return cls.from_dict(read_yaml(path) or {}, source=path.name)


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return [str(v) for v in value or []]


def reference_key(reference: str) -> tuple[str, str | None]:
    """Identity of a model reference: a resolved folder, or (repo id, revision with main == None)."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return (str(path.resolve()), None)
    repo_id, revision = split_reference(reference)
    return (repo_id, None if revision in (None, "main") else revision)
