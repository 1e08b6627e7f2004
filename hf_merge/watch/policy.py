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

import difflib
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from hf_merge.errors import RecipeError


@dataclass(frozen=True)
class Refusal:
    """Why a candidate is not merged. ``kind`` is a short category, ``reason`` one line for people."""

    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


@dataclass
class AdmissionPolicy:
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

    allow_pickle: bool = False
    licenses: list[str] | None = None
    owners: list[str] | None = None
    denied_owners: list[str] = field(default_factory=list)
    required_tags: list[str] = field(default_factory=list)
    tasks: dict[str, str] = field(default_factory=dict)
    max_forgetting: float | None = None
    min_gain: float | None = None
    eval_limit: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def has_gate(self) -> bool:
        """Whether candidates are evaluated before they are admitted."""
        return self.max_forgetting is not None or self.min_gain is not None

    def validate(self) -> None:
        """Check every field; :class:`RecipeError` naming the first bad one."""
        if not isinstance(self.allow_pickle, bool):
            raise RecipeError(f"`watch.allow_pickle` must be true or false, got {self.allow_pickle!r}")
        for name in ("licenses", "owners"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _string_list(name, value))
        for name in ("denied_owners", "required_tags"):
            setattr(self, name, _string_list(name, getattr(self, name) or []))
        if not isinstance(self.tasks, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.tasks.items()):
            raise RecipeError(f"`watch.tasks` must map repo ids to task names, got {self.tasks!r}")
        self.tasks = dict(self.tasks)
        for name in ("max_forgetting", "min_gain"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise RecipeError(f"`watch.{name}` must be a number of accuracy points, got {value!r}")
        if self.max_forgetting is not None and self.max_forgetting < 0:
            raise RecipeError(f"`watch.max_forgetting` must be >= 0, got {self.max_forgetting!r}")
        if self.eval_limit is not None and (isinstance(self.eval_limit, bool) or not isinstance(self.eval_limit, int) or self.eval_limit < 1):
            raise RecipeError(f"`watch.eval_limit` must be a positive integer, got {self.eval_limit!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, source: str = "recipe") -> "AdmissionPolicy":
        """Build from the ``watch:`` mapping; an unknown key is an error suggesting the closest one."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise RecipeError(f"`watch` in {source} must be a mapping of policy fields, got {type(data).__name__}")
        valid = [f.name for f in fields(cls)]
        for key in data:
            if key not in valid:
                matches = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
                hint = f"; did you mean 'watch.{matches[0]}'?" if matches else f" (valid: {', '.join(valid)})"
                raise RecipeError(f"unknown key 'watch.{key}' in {source}{hint}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``recipe.yaml``; defaults are left out."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            if value != default:
                data[f.name] = value
        return data

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


def _string_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise RecipeError(f"`watch.{name}` must be a list of names, got {value!r}")
    return list(value)


def load_policy_file(path: str) -> AdmissionPolicy:
    """A policy file: a recipe with a ``watch:`` section, or that section's mapping alone."""
    from pathlib import Path

    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise RecipeError(f"policy file {str(file)!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{file.name} is not valid YAML: {str(error).strip().splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise RecipeError(f"{file.name} must be a mapping with a `watch:` section")
    return AdmissionPolicy.from_dict(data["watch"] if "watch" in data else data, source=file.name)
