"""Cancellation and byte counting for one model download, shared by the full and the ranged path.

A download that runs in a background thread (:mod:`hf_merge.hub.prefetch`) cannot be killed; it has to
stop itself. :class:`Transfer` is what it checks: every chunk received goes through
:meth:`Transfer.received`, which raises :class:`DownloadCancelled` once the owner has called
:meth:`Transfer.cancel`. For full downloads the check rides on ``huggingface_hub``'s progress bar,
which the client updates after every chunk it writes (:meth:`Transfer.progress_class`).
"""

from __future__ import annotations

import threading
from typing import Any

from hf_merge.errors import HfMergeError


class DownloadCancelled(HfMergeError):
    """A download was stopped because its result is no longer wanted (an earlier step failed)."""


class Transfer:
    """The cancel switch and byte count of one download (thread-safe)."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self.bytes_received = 0  # counted by ranged downloads (full ones are counted by the server)

    def cancel(self) -> None:
        """Ask the download to stop at its next chunk."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise :class:`DownloadCancelled` if :meth:`cancel` was called."""
        if self._cancelled.is_set():
            raise DownloadCancelled("download cancelled")

    def received(self, count: int) -> None:
        """Count ``count`` bytes off the network, then stop if cancelled."""
        with self._lock:
            self.bytes_received += count
        self.check()

    def progress_class(self) -> type:
        """A ``huggingface_hub`` progress-bar class whose updates check this transfer's cancel switch."""
        from huggingface_hub.utils import tqdm

        transfer = self

        class _CancellableProgress(tqdm):
            def update(self, n: Any = 1) -> Any:
                transfer.check()
                return super().update(n)

        return _CancellableProgress
