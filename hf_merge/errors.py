"""Errors a user can act on.

Every failure hf-merge expects is one of these types. Each message is one line that says what is
wrong and what to do. The CLI prints ``str(error)`` and exits with ``error.exit_code``:
2 for bad usage (flags, recipe, the list of models), 1 for a failure at run time.
"""

from __future__ import annotations


class HfMergeError(Exception):
    """Base class of every error hf-merge raises on purpose."""

    exit_code: int = 1


class UsageError(HfMergeError):
    """The command line or the recipe is wrong; nothing was run."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe (YAML or flags) is invalid: unknown key, bad value, base listed as an expert, ..."""


class ModelNotFoundError(HfMergeError):
    """A repo id, revision or local folder could not be resolved to a model snapshot."""


class AuthenticationError(HfMergeError):
    """The Hub refused the token (missing, invalid, or without access to the repo)."""


class CheckpointError(HfMergeError):
    """A checkpoint cannot be read: missing or truncated file, NaN/Inf weights, pickle not allowed."""


class IncompatibleExpertError(HfMergeError):
    """An expert does not match the base: other architecture, tensor names, shapes or config."""


class MergeStateError(HfMergeError):
    """A saved merge state is missing, corrupt or belongs to another recipe."""


class EvaluationError(HfMergeError):
    """A task or its dataset is unusable: missing column, class-count mismatch, empty split, ..."""


class PushError(HfMergeError):
    """Publishing to the Hub failed; the local result is intact and ``retry_command`` re-sends it."""

    def __init__(self, message: str, retry_command: str | None = None):
        super().__init__(message)
        self.retry_command = retry_command


class SpaceError(HfMergeError):
    """Building, publishing or running the Gradio Space failed."""


class NotContinualError(UsageError):
    """The merge's method needs every expert at once (``iso_cts``, ``wudi``): a new expert changes
    every merged tensor, so ``add`` and the watcher cannot continue it; ``merge`` with all experts can."""
