"""Where a watcher finds candidates: new fine-tunes of the merged model's base on the Hub.

Sources, all through ``HfApi.list_models`` / ``model_info``:

- the Hub's relation tags ``base_model:finetune:<base>`` and ``base_model:adapter:<base>`` (PEFT LoRA
  adapters, merged as the model they stand for), newest first (``sort=createdAt``);
- every model of the given authors (``--author``) and search terms (``--search``);
- an allow-list file: one ``REPO[@REV]`` per line (``#`` starts a comment).

Each candidate is pinned to the commit the Hub reported, so what is checked is what is merged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hf_merge.errors import UsageError
from hf_merge.hub import client as hub
from hf_merge.hub.sources import split_reference


@dataclass(frozen=True)
class Candidate:
    """A model commit that might be merged.

    Attributes:
        repo_id: The candidate's repo id.
        sha: The commit to merge (40 hex digits).
        created: When the repo was created (``None`` if the Hub did not say).
        modified: When ``sha`` was committed (``None`` if the Hub did not say).
        tags: The Hub's tags of the repo (licence, ``base_model:...``, library, ...).
        card: The card's metadata (``license``, ``datasets``, ``model-index``, ...).
        source: How it was found: ``base_model`` (a fine-tune), ``adapter`` (an adapter of the base),
            ``author``, ``search``, ``allow-list``, ``webhook``.
    """

    repo_id: str
    sha: str
    created: datetime | None = None
    modified: datetime | None = None
    tags: tuple[str, ...] = ()
    card: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str = "base_model"

    @property
    def reference(self) -> str:
        """``repo_id@sha``, the pinned reference merged."""
        return f"{self.repo_id}@{self.sha}"

    @property
    def license(self) -> str | None:
        from hf_merge.publish.card import license_id

        value = license_id(self.card.get("license"))
        if value:
            return value
        return next((t.split(":", 1)[1] for t in self.tags if isinstance(t, str) and t.startswith("license:")), None)


def from_model_info(info: Any, source: str) -> Candidate:
    """A :class:`Candidate` from a ``ModelInfo`` of ``list_models`` or ``model_info``."""
    card = info.card_data.to_dict() if getattr(info, "card_data", None) is not None else {}
    return Candidate(
        repo_id=info.id, sha=info.sha or "", created=getattr(info, "created_at", None),
        modified=getattr(info, "last_modified", None), tags=tuple(info.tags or ()), card=card, source=source,
    )


def candidate_at(repo_id: str, revision: str | None = None, *, token: str | None = None, source: str = "allow-list") -> Candidate:
    """The candidate at a repo's revision (``main`` by default), pinned to its commit."""
    reference = repo_id if revision is None else f"{repo_id}@{revision}"
    with hub.hub_errors(reference, token=token):
        info = hub.api_client(token).model_info(repo_id, revision=revision)
    return from_model_info(info, source)


def read_allow_list(path: str | Path) -> list[str]:
    """References in an allow-list file; :class:`UsageError` if it cannot be read."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"allow-list file {file} does not exist: write one REPO[@REV] per line")
    lines = [line.split("#", 1)[0].strip() for line in file.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


@dataclass
class Discovery:
    """Finds candidates for a merged model built on ``base``.

    Attributes:
        base: Repo id of the merged model's base (θ0).
        exclude: Repo ids never considered (the merged repo itself, the base).
        authors: Also every model of these owners.
        searches: Also every model whose id contains one of these strings.
        allow_list: A file of references always considered.
        limit: At most this many models per Hub query (newest first).
    """

    base: str
    exclude: Sequence[str] = ()
    authors: Sequence[str] = ()
    searches: Sequence[str] = ()
    allow_list: str | Path | None = None
    limit: int = 100

    def find(self, token: str | None = None) -> list[Candidate]:
        """Every candidate, each repo once, oldest first (the order they are merged in)."""
        api = hub.api_client(token)
        found: dict[str, Candidate] = {}

        def take(infos: Iterable[Any], source: str) -> None:
            for info in infos:
                if info.id not in found and info.id not in self.exclude and info.sha:
                    found[info.id] = from_model_info(info, source)

        queries: list[tuple[dict[str, Any], str]] = [({"filter": f"base_model:finetune:{self.base}"}, "base_model"),
                                                     ({"filter": f"base_model:adapter:{self.base}"}, "adapter")]
        queries += [({"author": author}, "author") for author in self.authors]
        queries += [({"search": text}, "search") for text in self.searches]
        with hub.hub_errors(f"models of {self.base}", token=token):
            for params, source in queries:
                take(api.list_models(**params, sort="created_at", limit=self.limit, cardData=True), source)
        if self.allow_list is not None:
            for reference in read_allow_list(self.allow_list):
                repo_id, revision = split_reference(reference)
                if repo_id not in found and repo_id not in self.exclude:
                    found[repo_id] = candidate_at(repo_id, revision, token=token)
        # A repo without a creation date sorts first; arrival order is what a continual merge follows.
        return sorted(found.values(), key=lambda c: (c.created.timestamp() if c.created else 0.0, c.repo_id))
