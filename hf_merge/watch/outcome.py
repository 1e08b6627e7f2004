"""What a watcher did with one candidate, which failures it retries, and the crash tests' pause hook."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hf_merge.errors import AuthenticationError, ModelNotFoundError, PushError
from hf_merge.watch.ledger import candidate_key

PAUSE_ENV = "HF_MERGE_WATCH_PAUSE"  # "POINT:SECONDS": a test hook that holds the watcher at a point


@dataclass
class Outcome:
    """What a watcher did with one candidate.

    ``status``: ``merged``, ``proposed`` (a pull request), ``refused``, ``skipped`` (already decided,
    or not a fine-tune of the base) or ``failed`` (will be tried again: network, push). ``timings``:
    seconds per phase (``download``, ``merge``, ``gate``, ``push``).
    """

    repo_id: str
    sha: str
    status: str
    reason: str | None = None
    url: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return candidate_key(self.repo_id, self.sha)


# Failures of the Hub or the network, not of the candidate: tried again at the next pass.
RETRIED_ERRORS = (ModelNotFoundError, AuthenticationError, PushError, OSError)


def first_line(error: BaseException) -> str:
    """The first line of an error's text, control characters escaped, at most 300 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in (lines[0] if lines else type(error).__name__))
    return text[:300]


def pause_at(point: str, work_dir: Path) -> None:
    """Hold here for the seconds of ``HF_MERGE_WATCH_PAUSE=POINT:SECONDS`` (crash tests kill us here)."""
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, seconds = spec.partition(":")
    if name != point:
        return
    (work_dir / f".paused-{point}").write_text(str(os.getpid()), encoding="utf-8")
    time.sleep(float(seconds or 60))
