"""The ledger: every candidate a watcher has considered, keyed by ``repo_id@commit_sha``.

It is the file ``watch_ledger.json``, pushed with the merged model (so a restarted watcher, or one on
another machine, knows what was decided) and kept in the watcher's work folder between pushes.
Entries are ``merged`` (it is in the lineage), ``proposed`` (a pull request was opened), or
``refused`` with the reason. A refused candidate is never retried at the same commit; a new commit
of the same repo is a new key and is considered again.

The merged repo's lineage stays the truth for what was merged: an entry says ``merged`` only after
the push that put it in the lineage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hf_merge.io.merge_folder import LEDGER_FILENAME
from hf_merge.publish.card import register_card_section
from hf_merge.publish.escape import code_span, markdown_text

FINAL_STATUSES = ("merged", "proposed", "refused")


def candidate_key(repo_id: str, sha: str) -> str:
    """``repo_id@sha``: the identity of a candidate."""
    return f"{repo_id}@{sha}"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LedgerEntry:
    """What was decided about one candidate commit."""

    repo_id: str
    sha: str
    status: str
    reason: str | None = None
    kind: str | None = None
    date: str = ""
    url: str | None = None

    @property
    def key(self) -> str:
        return candidate_key(self.repo_id, self.sha)


class Ledger:
    """Entries by key, read from and written to a ``watch_ledger.json`` file (atomically)."""

    def __init__(self, entries: Iterable[LedgerEntry] = ()):
        self.entries: dict[str, LedgerEntry] = {e.key: e for e in entries}

    @classmethod
    def load(cls, folder: str | Path) -> Ledger:
        """The ledger of a folder; empty when it has none (or an unreadable one, which is logged)."""
        path = Path(folder) / LEDGER_FILENAME
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(LedgerEntry(**item) for item in data.get("entries", []))
        except (ValueError, TypeError, AttributeError):
            from hf_merge.log import get_logger

            get_logger(__name__).warning("Ignoring the unreadable %s", path)
            return cls()

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / LEDGER_FILENAME
        data = {"version": 1, "entries": [asdict(e) for e in sorted(self.entries.values(), key=lambda e: (e.date, e.key))]}
        tmp = path.with_name(f".{LEDGER_FILENAME}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    def get(self, repo_id: str, sha: str) -> LedgerEntry | None:
        return self.entries.get(candidate_key(repo_id, sha))

    def decided(self, repo_id: str, sha: str) -> bool:
        entry = self.get(repo_id, sha)
        return entry is not None and entry.status in FINAL_STATUSES

    def record(self, repo_id: str, sha: str, status: str, *, reason: str | None = None, kind: str | None = None,
               url: str | None = None) -> LedgerEntry:
        entry = LedgerEntry(repo_id=repo_id, sha=sha, status=status, reason=reason, kind=kind, date=utc_now(), url=url)
        self.entries[entry.key] = entry
        return entry

    def update(self, other: Ledger) -> bool:
        """Take the other ledger's final entries that this one lacks; whether anything changed."""
        changed = False
        for key, entry in other.entries.items():
            mine = self.entries.get(key)
            if entry.status in FINAL_STATUSES and (mine is None or mine.status not in FINAL_STATUSES):
                self.entries[key] = entry
                changed = True
        return changed

    def refused(self) -> list[LedgerEntry]:
        """Refused candidates, oldest first (the card's "Considered and not merged")."""
        return sorted((e for e in self.entries.values() if e.status == "refused"), key=lambda e: (e.date, e.key))

    def to_card(self) -> list[dict[str, Any]]:
        return [{"key": e.key, "repo_id": e.repo_id, "sha": e.sha, "reason": e.reason or "", "kind": e.kind or "",
                 "date": e.date[:10]} for e in self.refused()]


def _considered(folder: Path) -> list[dict[str, Any]]:
    """The card's list of candidates the watcher refused, from the folder's ledger; every field comes
    from another repo or its card, so each is escaped for Markdown and HTML."""
    return [{"repo_id": markdown_text(item["repo_id"]), "sha": code_span(str(item["sha"])[:12]),
             "reason": markdown_text(item["reason"]), "date": markdown_text(item["date"])}
            for item in Ledger.load(folder).to_card()]


# The card shows what the watcher refused; the card knows it only through this registration.
register_card_section("considered", _considered)
