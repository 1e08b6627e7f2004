"""The merge recipe: one typed description of a merge, whether it came from CLI flags or YAML.

A recipe is validated before anything is downloaded: an unknown key, a typo in a method parameter,
the base listed as an expert or an expert listed twice is a :class:`~hf_merge.errors.RecipeError`
naming the culprit (and, for typos, the closest valid spelling). The YAML form is what the merged
repo carries as ``recipe.yaml``, so a merge can be read, reproduced and continued from the Hub.

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

import difflib
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from hf_merge.errors import RecipeError
from hf_merge.hub.sources import split_reference
from hf_merge.watch.policy import AdmissionPolicy

RECIPE_FILENAME = "recipe.yaml"

SCOPES = ("vision", "text", "all")

# Used only until the methods registry can be imported: the parameters each method declares,
# with their defaults (OPCM.md, "reference settings from the paper's experiments").
_FALLBACK_METHOD_PARAMETERS: dict[str, dict[str, Any]] = {
    "opcm": {"alpha": 0.5, "zero_diagonal": True, "svd_dtype": "float32", "decomposition": "gram_mixed"},
    "average": {},
    "task_arithmetic": {"scaling_factor": 0.3},
    "ties": {"scaling_factor": 0.3, "threshold": 0.2},
    "magmax": {"scaling_factor": 0.5},
}

# Spellings people use for the same knob (the paper writes λ for the scaling factor, TIES keeps
# the top-k entries); an alias applies only where the method declares its target.
_PARAMETER_ALIASES = {
    "lambda": "scaling_factor", "lambda_": "scaling_factor", "lam": "scaling_factor", "scaling": "scaling_factor",
    "keep": "threshold", "k": "threshold", "top_k": "threshold",
}


def method_parameters(method: str) -> dict[str, Any]:
    """The parameters ``method`` declares, with their defaults.

    Raises:
        RecipeError: ``method`` is not a known merge method (the message suggests the closest).
    """
    declared = _registry_parameters()
    if declared is None:
        declared = _FALLBACK_METHOD_PARAMETERS
    if method not in declared:
        raise RecipeError(f"unknown merge method {method!r}{_suggest(method, declared)}; choose from {', '.join(sorted(declared))}")
    return dict(declared[method])


def known_methods() -> list[str]:
    """Names of every registered merge method."""
    declared = _registry_parameters()
    return sorted(declared if declared is not None else _FALLBACK_METHOD_PARAMETERS)


def _registry_parameters() -> dict[str, dict[str, Any]] | None:
    """``{method: {parameter: default}}`` from :mod:`hf_merge.merging.methods`, or ``None`` if unavailable."""
    try:
        from hf_merge.merging.methods.registry import METHODS
    except ImportError:  # torch missing: the recipe still validates against the fallback table
        return None
    return {name: dict(getattr(cls, "defaults", {}) or {}) for name, cls in METHODS.items()} or None


EVAL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EvalSpec:
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

    tasks: list[str] = field(default_factory=list)
    every_step: bool = False
    limit: int | None = None
    dtype: str = "float32"
    fast_preprocessing: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in EVAL_DTYPES:
            raise RecipeError(f"eval.dtype must be one of {', '.join(EVAL_DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"tasks": list(self.tasks), "every_step": self.every_step}
        if self.limit is not None:
            data["limit"] = self.limit
        if self.dtype != "float32":
            data["dtype"] = self.dtype
        if self.fast_preprocessing:
            data["fast_preprocessing"] = True
        return data


@dataclass
class MergeRecipe:
    """A validated description of a continual merge.

    Attributes:
        base: The pretrained model θ0: ``REPO[@REV]`` or a local folder.
        experts: Fine-tuned models, merged in this order (``REPO[@REV]`` or folders).
        method: A registered merge method (``opcm``, ``average``, ``task_arithmetic``, ``ties``, ``magmax``).
        parameters: The method's hyperparameters; unset ones take the method's defaults.
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
        watch: Admission policy of ``hf-merge watch`` (:class:`~hf_merge.watch.policy.AdmissionPolicy`).
        checkpoint_every: Write the output folder after every N-th step (the last step is always
            written; a crash resumes from the last written one). ``None``: the method's default
            (OPCM, TIES, MagMax 1; average and task arithmetic more, see the README's benchmark).
            Evaluating every step needs 1.
    """

    base: str
    experts: list[str]
    method: str = "opcm"
    parameters: dict[str, Any] = field(default_factory=dict)
    scope: str = "vision"
    eval: EvalSpec | None = None
    output: str | None = None
    push_to_hub: str | None = None
    private: bool = False
    space: str | None = None
    seed: int | None = None
    shuffle: bool = False
    allow_pickle: bool = False
    evict: bool = False
    partial_download: bool = True
    watch: AdmissionPolicy | None = None
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise :class:`RecipeError` on the first problem found."""
        if not isinstance(self.base, (str, Path)) or not str(self.base).strip():
            raise RecipeError("the recipe needs a base model: `base: REPO[@REV]` or a local folder")
        self.base = str(self.base)
        if isinstance(self.experts, (str, Path)):
            self.experts = [self.experts]
        if not isinstance(self.experts, list) or not self.experts:
            raise RecipeError("the recipe needs at least one expert: `experts: [REPO[@REV], ...]`")
        self.experts = [str(e) for e in self.experts]
        base_key = _reference_key(self.base)
        seen: dict[tuple, str] = {}
        for expert in self.experts:
            if not expert.strip():
                raise RecipeError("an expert reference is empty")
            key = _reference_key(expert)
            if key[:1] == base_key[:1] and (key == base_key or key[1] is None or base_key[1] is None):
                raise RecipeError(f"the base model {self.base!r} is also listed as an expert ({expert!r}); remove it from the experts")
            if key in seen:
                raise RecipeError(f"expert {expert!r} is listed twice (also as {seen[key]!r}); each expert is merged once")
            seen[key] = expert
        self.parameters = self._checked_parameters()
        if self.scope not in SCOPES:
            raise RecipeError(f"unknown scope {self.scope!r}{_suggest(self.scope, SCOPES)}; choose from {', '.join(SCOPES)}")
        if isinstance(self.eval, Mapping):
            self.eval = _eval_from_mapping(self.eval)
        if self.eval is not None:
            if not self.eval.tasks:
                raise RecipeError("`eval` needs at least one task: `eval: {tasks: [...]}`")
            if self.eval.limit is not None and (not isinstance(self.eval.limit, int) or self.eval.limit < 1):
                raise RecipeError(f"`eval.limit` must be a positive integer, got {self.eval.limit!r}")
        for name in ("push_to_hub", "space"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or value.count("/") != 1 or "@" in value):
                raise RecipeError(f"`{name}` must be a repo id `USER/NAME`, got {value!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise RecipeError(f"`seed` must be an integer, got {self.seed!r}")
        for name in ("private", "shuffle", "allow_pickle", "evict", "partial_download"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"`{name}` must be true or false, got {getattr(self, name)!r}")
        if self.watch is not None and not isinstance(self.watch, AdmissionPolicy):
            self.watch = AdmissionPolicy.from_dict(self.watch)
        every = self.checkpoint_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise RecipeError(f"`checkpoint_every` must be a positive integer, got {every!r}")
        if every is not None and every > 1 and self.eval is not None and self.eval.every_step:
            raise RecipeError("`eval.every_step` evaluates the written model after each step, so it needs `checkpoint_every: 1`")

    def _checked_parameters(self) -> dict[str, Any]:
        declared = method_parameters(self.method)
        if not isinstance(self.parameters, Mapping):
            raise RecipeError(f"`parameters` must be a mapping of {self.method} parameters, got {self.parameters!r}")
        checked: dict[str, Any] = {}
        for raw_name, value in self.parameters.items():
            name = raw_name
            if name not in declared and _PARAMETER_ALIASES.get(name) in declared:
                name = _PARAMETER_ALIASES[name]
            if name not in declared:
                hint = _suggest(raw_name, declared)
                valid = ", ".join(sorted(declared)) or "none"
                raise RecipeError(f"unknown parameter {raw_name!r} for method {self.method!r}{hint} (valid: {valid})")
            default = declared[name]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise RecipeError(f"parameter {raw_name!r} of {self.method!r} must be true or false, got {value!r}")
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise RecipeError(f"parameter {raw_name!r} of {self.method!r} must be a number, got {value!r}")
            checked[name] = value
        return checked

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
        for name in ("private", "shuffle", "allow_pickle", "evict"):
            if getattr(self, name):
                data[name] = True
        if not self.partial_download:
            data["partial_download"] = False
        if self.watch is not None:
            data["watch"] = self.watch.to_dict()
        return data

    def to_yaml(self) -> str:
        """The recipe as YAML (what ``recipe.yaml`` holds)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, folder: str | Path) -> Path:
        """Write ``recipe.yaml`` into ``folder``."""
        path = Path(folder) / RECIPE_FILENAME
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "recipe") -> "MergeRecipe":
        """Build and validate a recipe from plain data; unknown keys are errors with a suggestion."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source} must be a mapping of recipe fields, got {type(data).__name__}")
        valid = [f.name for f in fields(cls)]
        for key in data:
            if key not in valid:
                raise RecipeError(f"unknown key {key!r} in {source}{_suggest(str(key), valid)}")
        for required in ("base", "experts"):
            if data.get(required) in (None, "", []):
                raise RecipeError(f"{source} is missing `{required}`")
        values = dict(data)
        if values.get("parameters") is None:
            values["parameters"] = {}
        if isinstance(values.get("eval"), Mapping):
            values["eval"] = _eval_from_mapping(values["eval"], source=source)
        elif isinstance(values.get("eval"), (list, str)):
            values["eval"] = EvalSpec(tasks=_as_list(values["eval"]))
        if "watch" in values:
            values["watch"] = AdmissionPolicy.from_dict(values["watch"] or {}, source=source)
        return cls(**values)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "recipe") -> "MergeRecipe":
        """Parse a YAML recipe."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else "invalid YAML"
            raise RecipeError(f"{source} is not valid YAML: {first_line}") from None
        return cls.from_dict(data or {}, source=source)

    @classmethod
    def load(cls, path: str | Path) -> "MergeRecipe":
        """Read a YAML recipe file (or the ``recipe.yaml`` of a merge folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / RECIPE_FILENAME
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return cls.from_yaml(path.read_text(encoding="utf-8"), source=path.name)


def _eval_from_mapping(data: Mapping[str, Any], *, source: str = "recipe") -> EvalSpec:
    valid = [f.name for f in fields(EvalSpec)]
    for key in data:
        if key not in valid:
            raise RecipeError(f"unknown key {'eval.' + str(key)!r} in {source}{_suggest(str(key), valid, prefix='eval.')}")
    return EvalSpec(
        tasks=_as_list(data.get("tasks", [])),
        every_step=data.get("every_step", False),
        limit=data.get("limit"),
        dtype=data.get("dtype", "float32"),
        fast_preprocessing=bool(data.get("fast_preprocessing", False)),
    )


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return [str(v) for v in value or []]


def _reference_key(reference: str) -> tuple:
    """Identity of a model reference: a resolved folder, or (repo id, revision with main == None)."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return (str(path.resolve()), None)
    repo_id, revision = split_reference(reference)
    return (repo_id, None if revision in (None, "main") else revision)


def _suggest(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {prefix + matches[0]!r}?" if matches else ""
