"""The output folder of a merge, the one owner of its files' names and formats.

A merge folder holds the merged model (``config.json``, weights, processor files), ``README.md``
(the card) and three files that say how it was made: ``merge_state.json`` (what a resumed merge
needs, the lineage and the parents' licences: :class:`MergeState`), ``recipe.yaml`` (the recipe
that reproduces it) and ``eval_results.json`` (the accuracy matrix, when evaluated). Every module
reads and writes them through :class:`MergeFolder`; the weights themselves change only through
:class:`~hf_merge.merging.state.OutputTransaction`, which writes the state with them.

It lives in ``io/``, the lowest layer that touches files, because every layer above uses it: the
hub client (what a push sends), the engine's transaction, the evaluation, the card, the API and
the watcher. Typed results of the higher layers (the recipe, the evaluation report) are built by
their own modules from the plain data returned here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hf_merge.errors import MergeStateError
from hf_merge.io.yaml_file import load_yaml
from hf_merge.log import get_logger

logger = get_logger(__name__)

STATE_FILENAME = "merge_state.json"
RESULTS_FILENAME = "eval_results.json"
RECIPE_FILENAME = "recipe.yaml"
CARD_FILENAME = "README.md"
PLOT_FILENAME = "accuracy.png"
LEDGER_FILENAME = "watch_ledger.json"
#: What a merge publishes besides the model files (and what ``add`` downloads to continue one).
RESULT_FILES = (STATE_FILENAME, RECIPE_FILENAME, RESULTS_FILENAME, PLOT_FILENAME, LEDGER_FILENAME)
FORMAT_VERSION = 1
# Parents' licences as cards before version 0.2 kept them: a comment at the end of README.md.
_LEGACY_LICENSE_MARKER = "<!-- hf-merge parent licenses: "


@dataclass
class MergeState:
    """What a resumed merge needs, as saved in ``<output>/merge_state.json``.

    Attributes:
        method: Registered method name (``"opcm"``, ``"average"``, ...).
        hyperparameters: The method's hyperparameters, defaults filled in.
        scope: Which tensors are merged (``"vision"``, ``"all"``, or a list of name prefixes).
        step: How many experts have been merged.
        base: Provenance of θ0 (``ModelSource.to_dict()``; ``local_path`` for a local folder).
        lineage: One entry per merged expert, in order: provenance plus its ``step`` (1-based).
        method_state: The method's own scalars (OPCM: ``prev_lambda``, ``norms``).
        state_tensors: Name of the file holding tensors a method keeps besides the weights, if any.
        merged_names: The tensors merged (decided by the first expert; ``None`` before it, and in
            merges saved before this was recorded, where the whole scope was merged).
        from_base: Tensors of the scope kept from the base, with the reason.
        parent_licenses: The licence each parent declares, by display name (``None``: none
            declared), so that a card regenerated after the experts left the cache still knows them.
        tuning: What ``--tune`` tried and kept, one record per tuned step
            (:class:`~hf_merge.merging.tuning.TuningRecord`); ``None`` for an untuned merge.
    """

    method: str
    hyperparameters: dict[str, Any]
    scope: str | list[str] = "vision"
    step: int = 0
    base: dict[str, Any] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    method_state: dict[str, Any] = field(default_factory=dict)
    state_tensors: str | None = None
    merged_names: list[str] | None = None
    from_base: dict[str, str] | None = None
    parent_licenses: dict[str, str | None] | None = None
    tuning: list[dict[str, Any]] | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """The JSON text of ``merge_state.json`` (a field left unset is left out)."""
        data = asdict(self)
        if data["parent_licenses"] is None:
            del data["parent_licenses"]  # states of merges that never published read as before
        if data["tuning"] is None:
            del data["tuning"]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save(self, folder: str | Path) -> Path:
        """Write ``merge_state.json`` into ``folder`` atomically (temp file, fsync, rename)."""
        path = Path(folder) / STATE_FILENAME
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, folder: str | Path, *, strict: bool = True) -> MergeState:
        """Read ``<folder>/merge_state.json``; :class:`MergeStateError` if missing or corrupt.

        With ``strict=False`` (reading to show, not to resume), keys this version does not know
        are ignored and the ``experts`` list of early states reads as the lineage.
        """
        path = Path(folder) / STATE_FILENAME
        if not path.is_file():
            raise MergeStateError(f"{path}: no merge state here; this folder was not written by a merge")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
                raise MergeStateError(f"{path}: written by a newer hf-merge; upgrade to continue this merge")
            if not strict:
                if "lineage" not in data and isinstance(data.get("experts"), list):
                    data["lineage"] = data["experts"]
                known = {f.name for f in fields(cls)}
                data = {k: v for k, v in data.items() if k in known}
                data.setdefault("method", "opcm")
                data.setdefault("hyperparameters", {})
            return cls(**data)
        except (ValueError, TypeError) as err:
            raise MergeStateError(f"{path}: corrupt merge state ({err})") from err


@dataclass(frozen=True)
class MergeFolder:
    """A merge's output folder: its state, recipe, evaluation results and card inputs.

    Attributes:
        path: The folder.
    """

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    # ---- merge state
    def has_state(self) -> bool:
        """Whether the folder holds a merge (its ``merge_state.json``)."""
        return (self.path / STATE_FILENAME).is_file()

    def state(self, *, strict: bool = False) -> MergeState:
        """The merge state (:class:`MergeStateError` when there is none or it is corrupt)."""
        if not self.has_state():
            raise MergeStateError(f"{self.path} has no {STATE_FILENAME}: it is not an hf-merge result")
        return MergeState.load(self.path, strict=strict)

    def write_state(self, state: MergeState) -> Path:
        """Replace the merge state atomically."""
        return state.save(self.path)

    def lineage(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(base, experts)`` provenance dicts (name, repo_id, commit_sha, step) of the merge."""
        return lineage(self.state())

    # ---- parents' licences
    def licenses(self) -> dict[str, str | None]:
        """Each parent's licence, by display name: from the merge state, or (a folder published
        before licences moved there) from the comment its card kept them in."""
        state = self.state()
        if state.parent_licenses is not None:
            return dict(state.parent_licenses)
        return self._legacy_licenses()

    def record_licenses(self, licenses: dict[str, str | None]) -> None:
        """Keep the parents' licences in the merge state (every other key of the file as it was,
        so a state written by another version keeps what this one does not know)."""
        path = self.path / STATE_FILENAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise MergeStateError(f"{path}: cannot record the parents' licences ({error})") from None
        if not isinstance(data, dict):
            raise MergeStateError(f"{path}: corrupt merge state (not a JSON object)")
        data["parent_licenses"] = {str(k): (v if isinstance(v, str) else None) for k, v in licenses.items()}
        atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def _legacy_licenses(self) -> dict[str, str | None]:
        readme = self.path / CARD_FILENAME
        if not readme.is_file():
            return {}
        text = readme.read_text(encoding="utf-8", errors="replace")
        if _LEGACY_LICENSE_MARKER not in text:
            return {}
        try:
            recorded = json.loads(text.split(_LEGACY_LICENSE_MARKER, 1)[1].split(" -->", 1)[0])
        except (json.JSONDecodeError, IndexError):
            return {}
        if not isinstance(recorded, dict):
            return {}
        return {str(k): (v if isinstance(v, str) else None) for k, v in recorded.items()}

    # ---- evaluation results
    def has_results(self) -> bool:
        """Whether the merge was evaluated (``eval_results.json``)."""
        return (self.path / RESULTS_FILENAME).is_file()

    def results_data(self) -> dict[str, Any] | None:
        """The evaluation results as plain data (``None``: not evaluated, or unreadable)."""
        path = self.path / RESULTS_FILENAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("Ignoring unreadable %s", path)
            return None
        return data if isinstance(data, dict) else None

    def write_results_text(self, text: str) -> Path:
        """Replace ``eval_results.json`` atomically with ``text`` (an evaluation report's JSON)."""
        path = self.path / RESULTS_FILENAME
        atomic_write_text(path, text)
        return path

    # ---- recipe
    def recipe_text(self) -> str | None:
        """``recipe.yaml`` as written (ending in a newline), or ``None``."""
        path = self.path / RECIPE_FILENAME
        if not path.is_file():
            return None
        text = path.read_text(encoding="utf-8")
        return text if text.endswith("\n") else text + "\n"

    def recipe_data(self, *, source: str | None = None) -> Any:
        """``recipe.yaml`` parsed by the safe loader (size cap, no aliases), or ``None``."""
        path = self.path / RECIPE_FILENAME
        if not path.is_file():
            return None
        from hf_merge.io.yaml_file import read_yaml

        return read_yaml(path, source=source or RECIPE_FILENAME)

    def write_recipe_text(self, text: str) -> Path:
        """Write ``recipe.yaml``."""
        path = self.path / RECIPE_FILENAME
        atomic_write_text(path, text)
        return path

    # ---- card
    @property
    def card_path(self) -> Path:
        """``README.md``, the model card."""
        return self.path / CARD_FILENAME

    @property
    def plot_path(self) -> Path:
        """``accuracy.png``, the accuracy plot of the card."""
        return self.path / PLOT_FILENAME


def lineage(state: MergeState) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(base, experts)`` provenance dicts (name, repo_id, commit_sha, step) from a merge state."""
    base = dict(state.base or {})
    experts = []
    for index, entry in enumerate(state.lineage or [], start=1):
        entry = dict(entry.get("source", entry)) | {"step": entry.get("step", index)}
        experts.append(entry)
    return base, experts


def parse_yaml_field(text: str | None, key: str) -> Any:
    """One top-level field of a YAML text, or ``None`` when absent or unreadable."""
    if not text:
        return None
    try:
        data = load_yaml(text, source=RECIPE_FILENAME)
    except Exception:  # a display detail: an unreadable recipe shows without it
        return None
    return data.get(key) if isinstance(data, dict) else None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file, fsync and rename (readers see old or new)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (where the filesystem allows fsync on folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)
