"""Where a model comes from: a local folder, or a Hub repo id at a revision.

``resolve`` turns what a user typed (``"org/name"``, ``"org/name@rev"`` or a folder path) into a
:class:`ModelSource`: a local snapshot folder plus the provenance the merge state and the model card
record. Local folders work wherever a repo id does, as in ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import huggingface_hub

from hf_merge.errors import UsageError
from hf_merge.hub import client as hub
from hf_merge.io.lora import is_adapter_repo
from hf_merge.log import get_logger

if TYPE_CHECKING:
    from hf_merge.hub.transfer import Transfer

logger = get_logger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """A model snapshot on local disk and where it came from.

    Attributes:
        path: Folder with ``config.json`` and the weights (safetensors, single or sharded).
        repo_id: Hub repo id, or ``None`` for a plain local folder.
        revision: The revision the user asked for (branch, tag or sha), or ``None``.
        commit_sha: The exact commit the snapshot was downloaded from, or ``None`` for a folder.
        tensor_prefixes: Set when only the tensors under these name prefixes were downloaded
            (a partial snapshot, see :mod:`hf_merge.hub.ranged`); ``None`` for a complete one.
        conversion_pr: When the revision had only pickle weights and the safetensors came from
            the Hub's conversion pull request: its ``ref``, ``num``, ``commit_sha`` (= ``commit_sha``)
            and ``revision_commit`` (the commit of the revision asked for).
    """

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit_sha: str | None = None
    tensor_prefixes: tuple[str, ...] | None = None
    conversion_pr: dict[str, Any] | None = None

    @classmethod
    def local(cls, path: str | Path) -> ModelSource:
        """A plain local folder, with no Hub provenance."""
        return cls(path=Path(path).expanduser().resolve())

    @property
    def name(self) -> str:
        """What to show a person: the repo id (with revision if pinned) or the folder path."""
        if self.repo_id is None:
            return str(self.path)
        return self.repo_id if self.revision in (None, "main") else f"{self.repo_id}@{self.revision}"

    def require_tensors(self, names: Sequence[str]) -> None:
        """:class:`UsageError` if a partial download lacks one of ``names`` (needed by the merge)."""
        prefixes = self.tensor_prefixes or ()
        missing = next((n for n in names if self.tensor_prefixes is not None and not n.startswith(prefixes)), None)
        if missing is not None:
            raise UsageError(
                f"{self.name} was downloaded for tensors under {', '.join(prefixes)} only, but the merge also "
                f"needs '{missing}'; download it in full (partial_download: false)"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready provenance (the path is local and therefore not recorded)."""
        data = asdict(self)
        data.pop("path")
        data.pop("tensor_prefixes")  # how it was downloaded is not part of what was merged
        data["name"] = self.name
        return data


def split_reference(reference: str) -> tuple[str, str | None]:
    """Split ``"org/name@rev"`` into ``("org/name", "rev")``; no ``@`` gives revision ``None``."""
    if "@" in reference:
        repo_id, _, revision = reference.partition("@")
        return repo_id, revision or None
    return reference, None


def resolve(
    reference: str | Path | ModelSource,
    *,
    token: str | None = None,
    allow_pickle: bool = False,
    tensor_prefixes: Sequence[str] | None = None,
    transfer: Transfer | None = None,
) -> ModelSource:
    """Resolve a folder path, ``repo_id`` or ``repo_id@revision`` to a local snapshot.

    An existing local folder wins over a repo id of the same spelling, as in ``from_pretrained``.
    Repo ids are downloaded with :func:`download_model` (safetensors, config and
    processor files only; with ``tensor_prefixes``, only those tensors when the server allows).
    """
    if isinstance(reference, ModelSource):
        return reference
    path = Path(reference).expanduser()
    if path.is_dir():
        return ModelSource.local(path)
    repo_id, revision = split_reference(str(reference))
    return download_model(repo_id, revision=revision, token=token, allow_pickle=allow_pickle,
                          tensor_prefixes=tensor_prefixes, transfer=transfer)


def download_model(
    repo_id: str,
    revision: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
    *,
    extra_patterns: Sequence[str] = (),
    local_dir: str | Path | None = None,
    tensor_prefixes: Sequence[str] | None = None,
    transfer: Transfer | None = None,
) -> ModelSource:
    """Download the files of a model repo that a merge needs and pin the commit they came from.

    Args:
        repo_id: ``"org/name"`` on the Hub.
        revision: Branch, tag or commit sha (default: ``main``).
        token: Token for private or gated repos; defaults to ``HF_TOKEN`` or the stored login.
        allow_pickle: Also accept ``.bin`` weights (loaded later with ``weights_only=True``).
        extra_patterns: More file patterns to fetch (``merge_state.json`` to continue a merge).
        local_dir: Download into this folder instead of the cache (a writable copy).
        tensor_prefixes: Download only the tensors whose names start with these prefixes, by HTTP
            ranges, into a partial snapshot outside the Hub cache (:mod:`hf_merge.hub.ranged`); the full
            snapshot when the server or the repo does not allow it.
        transfer: Cancel switch and byte counter of this download (:class:`hf_merge.hub.transfer.Transfer`).

    Returns:
        A :class:`ModelSource` with the local snapshot folder and the exact commit sha.

    Raises:
        ModelNotFoundError: The repo or revision does not exist (or is private and no token was given).
        AuthenticationError: The token was refused, or has no access to a gated repo.
        CheckpointError: The repo has no safetensors weights (pickle only, and not allowed).
    """
    token = hub.resolve_token(token)
    reference = repo_id if revision is None else f"{repo_id}@{revision}"
    with hub.hub_errors(reference, token=token):
        weights = hub.resolve_weights(repo_id, revision, token=token, allow_pickle=allow_pickle)
        pickle = allow_pickle and not weights.has_safetensors  # never both: safetensors win
        patterns = list(hub.MODEL_PATTERNS) + list(extra_patterns) + (list(hub.PICKLE_PATTERNS) if pickle else [])
        pr = weights.conversion_pr
        if pr is not None:
            logger.info(
                "%s has only pickle weights at %s; using the safetensors of the Hub's conversion pull request %s (%s)",
                reference, pr.revision_commit[:10], pr.ref, pr.commit_sha[:10],
            )
        # An adapter is small and its tensor names are not the model's: always downloaded whole.
        if tensor_prefixes is not None and local_dir is None and weights.commit_sha and not pickle \
                and not is_adapter_repo(weights.files):
            from hf_merge.hub.ranged import download_ranged

            partial = download_ranged(repo_id, weights.commit_sha, weights.files, tensor_prefixes, token=token, transfer=transfer)
            if partial is not None:
                return ModelSource(path=partial.path, repo_id=repo_id, revision=revision, commit_sha=weights.commit_sha,
                                   tensor_prefixes=tuple(tensor_prefixes),
                                   conversion_pr=pr.to_dict() if pr is not None else None)
        if pr is None:
            logger.info("Downloading %s (%s)", reference, weights.commit_sha[:10] or "?")
        path = huggingface_hub.snapshot_download(
            repo_id,
            # Pin the commit that was checked, so the recorded sha is the one whose files we have.
            revision=weights.commit_sha or revision,
            token=token if token else False,
            allow_patterns=patterns,
            local_dir=local_dir,
            endpoint=hub.endpoint(),
            library_name="hf-merge",
            tqdm_class=transfer.progress_class() if transfer is not None else None,
        )
    return ModelSource(
        path=Path(path), repo_id=repo_id, revision=revision, commit_sha=weights.commit_sha or Path(path).name,
        conversion_pr=pr.to_dict() if pr is not None else None,
    )


def evict(source: ModelSource) -> bool:
    """Delete a downloaded snapshot from the Hub cache (blobs shared with other revisions stay),
    or a partial download (:mod:`hf_merge.hub.ranged`) from hf-merge's own cache.

    Only snapshots inside the Hub cache are touched; local folders are never deleted.
    Returns whether something was deleted.
    """
    if source.repo_id is None or source.commit_sha is None:
        return False
    cache = Path(hub.constants.HF_HUB_CACHE).resolve()
    if source.tensor_prefixes is not None:
        from hf_merge.hub.ranged import remove_snapshot

        logger.info("Evicting the partial download of %s", source.name)
        if not remove_snapshot(source.path):
            return False
        if not cache.is_dir():
            return True
        # The checks before the merge put this commit's config.json in the Hub cache: it goes too.
    elif cache not in Path(source.path).resolve().parents:
        return False
    try:
        scan = huggingface_hub.scan_cache_dir(cache)
        if source.tensor_prefixes is not None and not any(
            r.commit_hash == source.commit_sha for repo in scan.repos if repo.repo_id == source.repo_id for r in repo.revisions
        ):
            return True
        strategy = scan.delete_revisions(source.commit_sha)
    except Exception as error:  # a cache we cannot scan is not worth failing a finished merge for
        logger.warning("Could not evict %s from the cache: %s", source.name, type(error).__name__)
        return source.tensor_prefixes is not None
    logger.info("Evicting %s from the cache (%s)", source.name, strategy.expected_freed_size_str)
    strategy.execute()
    return True
