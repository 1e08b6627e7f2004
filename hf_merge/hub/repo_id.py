"""Repo ids as the Hub accepts them: one check, huggingface_hub's own, for every id hf-merge names."""

from __future__ import annotations

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


def repo_id_problem(value: object) -> str | None:
    """Why ``value`` is not a ``USER/NAME`` repo id the Hub accepts, or ``None`` when it is one.

    ``huggingface_hub.utils.validate_repo_id`` also accepts a bare ``NAME`` (the Hub's canonical
    models of old); hf-merge creates and pushes repos, which always have an owner.
    """
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}"
    if value.count("/") != 1:
        return "it needs exactly one '/' between owner and name"
    try:
        validate_repo_id(value)
    except HFValidationError:
        # Its message quotes the value whole (newlines included): say the rule instead.
        return "it may hold only letters, digits, '-', '_' and '.' (not first or last), at most 96 characters"

    return None


def is_repo_id(value: object) -> bool:
    """Whether ``value`` is a ``USER/NAME`` repo id the Hub accepts."""
    return repo_id_problem(value) is None
