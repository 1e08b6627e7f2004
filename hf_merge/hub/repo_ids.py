"""Repo ids and model references a command names, checked before anything is downloaded.

A push target such as ``alice/x y`` used to be refused by the Hub only after the merge had run; a
reference with a newline in it printed an error over two lines. :func:`check_names` is called by
every command of the Python API (so by every CLI command) before its first download: repo ids go
through ``huggingface_hub``'s own validator, and no name with a control character gets further.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_merge.errors import UsageError


def shown(value: str) -> str:
    """``value`` quoted for a one-line message: control characters escaped, never printed raw."""
    return repr(value)


def has_control_characters(value: str) -> bool:
    """``value`` holds a newline, tab, escape or another character that is not printable."""
    return any(not char.isprintable() for char in value)


def check_repo_id(value: str, what: str) -> None:
    """Raise :class:`UsageError` unless ``value`` is a valid Hub repo id (``USER/NAME``).

    Args:
        value: The repo id as the user gave it.
        what: Where it came from, for the message (``--push-to-hub``, ``push_to_hub``, ...).
    """
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a repo id USER/NAME, got {shown(str(value))}")
    try:
        if has_control_characters(value):
            raise HFValidationError("control character")
        validate_repo_id(value)
    except HFValidationError:
        raise UsageError(
            f"{what} {shown(value)} is not a valid repo id: use USER/NAME made of letters, digits, '-', '_' and '.' "
            "(at most 96 characters, not starting or ending with '-' or '.')"
        ) from None


def check_reference(value: str, what: str) -> None:
    """Raise :class:`UsageError` if a model reference (``REPO[@REV]`` or a local folder) holds a
    control character. Other mistakes (no such folder, no such repo) are reported where the model
    is looked up, with the reason the Hub gives."""
    if not isinstance(value, str) or has_control_characters(value):
        raise UsageError(
            f"{what} {shown(str(value))} contains a control character (newline, tab, ...); "
            "give a repo id USER/NAME[@REVISION] or a folder path"
        )


def check_names(
    *,
    repo_ids: Mapping[str, str | None] | None = None,
    references: Mapping[str, Sequence[str | Path] | str | Path | None] | None = None,
) -> None:
    """Check every repo id and model reference a command names, before anything runs.

    Args:
        repo_ids: Where each repo id came from -> the repo id (``None``: not given, skipped);
            these must be Hub repo ids (push targets, Spaces, the repo ``add`` continues).
        references: Where they came from -> model references (``REPO[@REV]`` or folders).

    Raises:
        UsageError: One line naming the bad value (control characters escaped).
    """
    for what, values in (references or {}).items():
        if values is None:
            continue
        for value in [values] if isinstance(values, (str, Path)) else values:
            if not isinstance(value, Path):
                check_reference(value, what)
    for what, repo_id in (repo_ids or {}).items():
        if repo_id is not None:
            check_repo_id(repo_id, what)


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
