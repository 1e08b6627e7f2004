"""A watcher's pushes: one commit per decision, on top of the commit it was computed from.

Every push names its parent commit, so a merged repo that moved meanwhile (another person's push,
a second watcher) is never overwritten: the Hub answers 412 and the watcher starts again from the
new head. A push that fails for any other reason than a refusal is retried with exponential
backoff; the local result is kept either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from huggingface_hub import CommitOperationAdd

from hf_merge.hub import client as hub
from hf_merge.errors import PushError
from hf_merge.log import get_logger

logger = get_logger(__name__)


class StaleParentError(PushError):
    """The merged repo has a new commit since the result was computed; recompute on top of it."""


@dataclass
class RetryPolicy:
    """``attempts`` tries, waiting ``first_delay_s``, then twice as long each time, at most ``max_delay_s``."""

    attempts: int = 5
    first_delay_s: float = 2.0
    max_delay_s: float = 60.0

    def delays(self) -> list[float]:
        return [min(self.first_delay_s * 2**i, self.max_delay_s) for i in range(max(self.attempts - 1, 0))]


def push_files(
    folder: Path,
    repo_id: str,
    files: Sequence[Path],
    *,
    token: str | None,
    parent_commit: str | None,
    message: str,
    create_pr: bool = False,
    retry: RetryPolicy | None = None,
) -> str:
    """Commit ``files`` (relative to ``folder``) to ``repo_id``; the commit (or pull request) URL.

    Raises:
        StaleParentError: ``parent_commit`` is no longer the head of ``main``.
        PushError: The Hub refused the push (401/403/4xx), or every retry failed.
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
            status = hub._status(error)
            if status == 412:
                raise StaleParentError(f"{repo_id} changed since {str(parent_commit)[:10]}; recomputing on its new head",
                                       None) from None
            why = hub._push_failure(error, repo_id, folder, token)
            if (status is not None and 400 <= status < 500 and status != 429) or attempt == len(delays):
                raise PushError(why, None) from None
            logger.warning("Push to %s failed (%s); retrying in %.0f s", repo_id, why.split(";")[0], delays[attempt])
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


def push_result(folder: Path, repo_id: str, **kwargs) -> str:
    """Push a merge folder's publishable files (weights, card, state, recipe, results, ledger)."""
    return push_files(folder, repo_id, hub.publishable_files(folder), **kwargs)
