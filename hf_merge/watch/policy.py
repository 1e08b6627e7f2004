"""The admission policy: which new fine-tunes a watcher may merge (the ``watch:`` section of a recipe).

Example (in ``recipe.yaml`` or a policy file of its own)::

    watch:
      licenses: [mit, apache-2.0]       # allowed licences (omit: any)
      owners: [alice, bob]              # allowed owners (omit: any)
      denied_owners: [mallory]
      required_tags: [clip]
      allow_pickle: false               # safetensors only
      tasks: {bob/clip-mnist: mnist}    # a candidate's evaluation task, when its card does not say
      max_forgetting: 2.0               # points the old tasks' average may drop
      min_gain: 1.0                     # points the new task must gain over the base
      eval_limit: 256

Checks that need only the candidate's metadata live here and return a :class:`Refusal`; the
checks that need weights are the preflight (architecture), the merge itself (NaN, tensor shapes)
and the quality gate (:mod:`hf_merge.watch.gate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, field_validator
from pydantic.json_schema import JsonDict

from hf_merge.declared import POSITIVE_INTEGER, excerpt, one_line
from hf_merge.errors import RecipeError
from hf_merge.io.yaml_file import read_yaml
from hf_merge.recipe_sections import register_section


@dataclass(frozen=True)
class Refusal:
    """Why a candidate is not merged. ``kind`` is a short category, ``reason`` one line for people."""

    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


_POINTS: JsonDict = {"expects": "a number of accuracy points"}


class AdmissionPolicy(BaseModel):
    """What a candidate must satisfy before it is merged.

    Attributes:
        allow_pickle: Accept pickle-only (``.bin``) checkpoints; off: safetensors only.
        licenses: Allowed licences (card ``license``); ``None`` allows any, including none declared.
        owners: Allowed owners (namespace of the repo id); ``None`` allows any.
        denied_owners: Owners never merged.
        required_tags: Tags a candidate must all carry.
        tasks: Candidate repo id -> evaluation task; otherwise read from its card.
        max_forgetting: Most points (0-100 scale) the average accuracy on the merged tasks may drop.
        min_gain: Fewest points the candidate's task must gain over the base's zero-shot accuracy.
        eval_limit: Evaluate the gate on at most this many examples per task.
    """

    model_config = ConfigDict(extra="forbid")

    allow_pickle: StrictBool = False
    licenses: list[str] | None = None
    owners: list[str] | None = None
    denied_owners: list[str] = Field(default_factory=list)
    required_tags: list[str] = Field(default_factory=list)
    tasks: dict[str, str] = Field(default_factory=dict)
    max_forgetting: StrictFloat | None = Field(default=None, ge=0, json_schema_extra=_POINTS)
    min_gain: StrictFloat | None = Field(default=None, json_schema_extra=_POINTS)
    eval_limit: StrictInt | None = Field(default=None, ge=1, json_schema_extra=POSITIVE_INTEGER)

    def __init__(self, **data: Any) -> None:
        source = str(data.pop("_source", "recipe"))
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise one_line(error, type(self), source=source, prefix="watch.") from None

    @field_validator("licenses", "owners", "denied_owners", "required_tags", mode="before")
    @classmethod
    def _names(cls, value: Any, info: Any) -> Any:
        if value is None:
            return None if info.field_name in ("licenses", "owners") else []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"`watch.{info.field_name}` must be a list of names, got {excerpt(value)}")
        return list(value)

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError(f"`watch.tasks` must map repo ids to task names, got {excerpt(value)}")
        return dict(value)

    @property
    def has_gate(self) -> bool:
        """Whether candidates are evaluated before they are admitted."""
        return self.max_forgetting is not None or self.min_gain is not None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, source: str = "recipe") -> AdmissionPolicy:
        """Build from the ``watch:`` mapping; an unknown key is an error suggesting the closest one."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise RecipeError(f"`watch` in {source} must be a mapping of policy fields, got {type(data).__name__}")
        return cls(**{str(k): v for k, v in data.items()}, _source=source)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``recipe.yaml``; defaults are left out."""
        defaults = type(self)()
        return {name: getattr(self, name) for name in type(self).model_fields
                if getattr(self, name) != getattr(defaults, name)}

    # ---- checks on metadata ------------------------------------------------------------------------
    def check_metadata(self, repo_id: str, *, license: str | None, tags: list[str]) -> Refusal | None:
        """Owner, licence and tag rules, from what the Hub says about the candidate."""
        owner = repo_id.split("/", 1)[0]
        if owner in self.denied_owners:
            return Refusal("owner", f"owner {owner!r} is denied by the policy")
        if self.owners is not None and owner not in self.owners:
            return Refusal("owner", f"owner {owner!r} is not in the allowed owners ({', '.join(self.owners) or 'none'})")
        if self.licenses is not None and license not in self.licenses:
            declared = repr(license) if license else "none declared"
            return Refusal("license", f"license {declared} is not allowed ({', '.join(self.licenses) or 'none'})")
        missing = [tag for tag in self.required_tags if tag not in tags]
        if missing:
            return Refusal("tags", f"missing required tag{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        return None


def load_policy_file(path: str) -> AdmissionPolicy:
    """A policy file: a recipe with a ``watch:`` section, or that section's mapping alone."""
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise RecipeError(f"policy file {str(file)!r} does not exist")
    data = read_yaml(file) or {}
    if not isinstance(data, Mapping):
        raise RecipeError(f"{file.name} must be a mapping with a `watch:` section")
    return AdmissionPolicy.from_dict(data["watch"] if "watch" in data else data, source=file.name)


# The watcher owns the recipe's `watch:` section; the recipe knows it only through this registration.
register_section("watch", lambda value, source: AdmissionPolicy.from_dict(value, source=source), AdmissionPolicy.to_dict)
