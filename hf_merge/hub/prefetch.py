"""Download the next expert while the current one merges, never more than one ahead.

:class:`Prefetcher` hands out resolved :class:`~hf_merge.hub.sources.ModelSource` objects in order.
When the caller takes expert ``t``, expert ``t+1`` starts downloading in a background thread, and
``t+2`` waits until the caller asks for ``t+1``. A caller that evicts each expert once merged (before
asking for the next) thus has at most two experts on disk: the one merging and the one arriving.

A failed download raises its own (one-line) error when the caller asks for that expert, not
before: the experts before it merge as they would without prefetching. When the caller stops
early (an error, a break, Ctrl-C), :meth:`Prefetcher.close` cancels the download in flight, waits
for its thread and removes what it left: the client's incomplete files, or the whole download when
``discard`` says downloads are not kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hf_merge.hub.sources import ModelSource, split_reference
from hf_merge.hub.transfer import DownloadCancelled, Transfer
from hf_merge.log import get_logger

logger = get_logger(__name__)

Fetch = Callable[[Any, Transfer], ModelSource]
THREAD_PREFIX = "hf-merge-prefetch"


class _Download:
    """One download running in its own thread."""

    def __init__(self, index: int, reference: Any, fetch: Fetch):
        self.reference = reference
        self.transfer = Transfer()
        self.source: ModelSource | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fetch,), name=f"{THREAD_PREFIX}-{index}", daemon=True)
        self.thread.start()

    def _run(self, fetch: Fetch) -> None:
        try:
            self.source = fetch(self.reference, self.transfer)
        except BaseException as error:  # handed to the caller's thread, raised there
            self.error = error

    def result(self) -> ModelSource:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.source is not None
        return self.source


class Prefetcher:
    """Iterate over resolved experts, downloading the next one while the caller works on the current.

    Args:
        references: What to resolve, in order (repo ids, folders, :class:`ModelSource`).
        fetch: ``fetch(reference, transfer) -> ModelSource``; it must check ``transfer`` while it
            downloads (``sources.resolve(..., transfer=transfer)`` does).
        ahead: ``1`` to download one expert ahead, ``0`` to download each only when asked for.
        discard: Called on a download that finished but was never handed out (``sources.evict``
            when the merge evicts its experts); ``None`` keeps it.

    Use as a context manager, so that an early exit cancels the download in flight::

        with Prefetcher(experts, fetch) as fetched:
            for source in fetched:
                merger.add(source)
    """

    def __init__(self, references: Sequence[Any], fetch: Fetch, *, ahead: int = 1,
                 discard: Callable[[ModelSource], Any] | None = None):
        if ahead not in (0, 1):
            raise ValueError("ahead must be 0 or 1")
        self.references = list(references)
        self.fetch = fetch
        self.ahead = ahead
        self.discard = discard
        self._pending: _Download | None = None
        self._pending_index = -1

    def __iter__(self) -> Iterator[ModelSource]:
        try:
            for index, reference in enumerate(self.references):
                if self.ahead == 0:
                    source = self.fetch(reference, Transfer())
                else:
                    if self._pending is None or self._pending_index != index:
                        self._start(index)
                    pending, self._pending = self._pending, None
                    assert pending is not None
                    source = pending.result()  # this expert's download error surfaces here
                    if index + 1 < len(self.references):
                        self._start(index + 1)
                yield source
        finally:
            self.close()

    def _start(self, index: int) -> None:
        logger.debug("prefetching %s", self.references[index])
        self._pending = _Download(index, self.references[index], self.fetch)
        self._pending_index = index

    def close(self) -> None:
        """Cancel the download in flight (if any), wait for its thread, and clean up after it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.transfer.cancel()
        pending.thread.join()
        if pending.source is not None:
            if self.discard is not None:
                self.discard(pending.source)
            return
        if not isinstance(pending.error, DownloadCancelled):
            logger.debug("prefetch of %s failed after the merge stopped: %s", pending.reference, pending.error)
        _remove_incomplete(pending.reference)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_incomplete(reference: Any) -> None:
    """Delete the Hub client's half-written blobs of a repo whose download was stopped midway.

    (Partial downloads clean up after themselves: they are built in a temporary folder.)"""
    if isinstance(reference, ModelSource) or Path(str(reference)).expanduser().is_dir():
        return
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo_id, _ = split_reference(str(reference))
    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    for path in blobs.glob("*.incomplete") if blobs.is_dir() else ():
        try:
            path.unlink()
        except OSError:
            pass
