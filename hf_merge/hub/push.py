"""The one push path: a merge result (or some of its files) as ONE commit, retried with backoff.

``hf-merge merge``, ``add``, ``push`` and the watcher all push through :func:`push_files`. A
push may name its parent commit, so a repo that moved meanwhile (another person's push, a second
watcher) is never overwritten: the Hub answers 412 and :class:`StaleParentError` says so. A push
that fails for another reason than a refusal (5xx, 429, the network) is retried with exponential
backoff; a refusal (401, 403, other 4xx) is not. The local result is kept either way, and
:func:`push_merge` attaches the exact ``hf-merge push`` command that re-sends it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd

from hf_merge.errors import PushError
from hf_merge.hub import client as hub
from hf_merge.log import get_logger

logger = get_logger(__name__)


class StaleParentError(PushError):
    """The repo has a new commit since the result was computed; recompute on top of it."""


@dataclass
class RetryPolicy:
    """``attempts`` tries, waiting ``first_delay_s``, then twice as long each time, at most ``max_delay_s``."""

    attempts: int = 5
    first_delay_s: float = 2.0
    max_delay_s: float = 60.0

    def delays(self) -> list[float]:
        """The waits between attempts, in seconds."""
        return [min(self.first_delay_s * 2**i, self.max_delay_s) for i in range(max(self.attempts - 1, 0))]


def push_files(
    folder: Path,
    repo_id: str,
    files: Sequence[Path],
    *,
    token: str | None,
    message: str,
    parent_commit: str | None = None,
    create_pr: bool = False,
    retry: RetryPolicy | None = None,
    retry_command: str | None = None,
) -> str:
    """Commit ``files`` (relative to ``folder``) to ``repo_id``; the commit (or pull request) URL.

    Raises:
        StaleParentError: ``parent_commit`` is no longer the head of ``main``.
        PushError: The Hub refused the push (401/403/4xx), or every retry failed; its
            ``retry_command`` is ``retry_command``.
    """
    retry = retry or RetryPolicy()
    api = hub.api_client(token)
    operations = [CommitOperationAdd(path_in_repo=f.as_posix(), path_or_fileobj=str(folder / f)) for f in files]
    delays = retry.delays()
    for attempt in range(len(delays) + 1):
        try:
            info = api.create_commit(repo_id, operations, commit_message=message, create_pr=create_pr,
                                     parent_commit=None if create_pr else parent_commit, repo_type="model")
            return info.pr_url if create_pr and info.pr_url else info.commit_url
        except Exception as error:
            status = hub.status_of(error)
            if status == 412:
                raise StaleParentError(f"{repo_id} changed since {str(parent_commit)[:10]}; recomputing on its new head",
                                       None) from None
            why = hub.push_failure(error, repo_id, folder, token)
            if (status is not None and 400 <= status < 500 and status != 429) or attempt == len(delays):
                raise PushError(why, retry_command) from None
            logger.warning("Push to %s failed (%s); retrying in %.0f s", repo_id, why.split(";")[0], delays[attempt])
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


def push_merge(
    output_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    commit_message: str | None = None,
    *,
    parent_commit: str | None = None,
    retry: RetryPolicy | None = None,
) -> str:
    """Publish a merge folder as ONE commit: weights, config, processor, card, recipe, state, results.

    Returns:
        The commit URL (the pull request URL when ``create_pr``).

    Raises:
        PushError: The Hub refused or could not be reached; the folder is left untouched and
            ``error.retry_command`` re-sends it.
    """
    output_dir = Path(output_dir)
    command = hub.retry_command(output_dir, repo_id, private=private, create_pr=create_pr, commit_message=commit_message)
    files = hub.publishable_files(output_dir)
    if not any(str(f).endswith(".safetensors") for f in files) or Path("config.json") not in files:
        raise PushError(f"{output_dir} is not a merge result (no config.json or .safetensors weights)", command)
    token = hub.resolve_token(token)
    try:
        hub.api_client(token).create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except Exception as error:
        raise PushError(hub.push_failure(error, repo_id, output_dir, token), command) from None
    logger.info("Pushing %d files to %s", len(files), repo_id)
    return push_files(output_dir, repo_id, files, token=token, parent_commit=parent_commit, create_pr=create_pr,
                      message=commit_message or f"hf-merge: upload merged model ({len(files)} files)",
                      retry=retry, retry_command=command)
