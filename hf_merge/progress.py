"""Progress as a person reads it: one bar per phase in a terminal, one line per step elsewhere.

In a terminal a phase (merging the experts, say) shows one bar, and the Hub client's per-file
download bars inside it are switched off, so bars never nest or interleave. Without a terminal
(CI, a log file) no bar is drawn at all: each step is one log line. ``HF_HUB_DISABLE_PROGRESS_BARS``
switches every bar off, the Hub client's and hf-merge's alike.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hf_merge.log import get_logger

logger = get_logger(__name__)

_active_phases = 0


def bars_disabled_by_user() -> bool:
    """``HF_HUB_DISABLE_PROGRESS_BARS`` is set: no bar anywhere."""
    return os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in {"1", "TRUE", "YES", "ON"}


def bars_wanted() -> bool:
    """Whether to draw bars: stderr is a terminal and the user did not switch them off."""
    stream = sys.stderr
    return not bars_disabled_by_user() and bool(getattr(stream, "isatty", lambda: False)())


def inner_bar_allowed() -> bool:
    """A bar of its own (an evaluation's batches) is drawn only outside a phase that has one."""
    return bars_wanted() and _active_phases == 0


def configure_client_bars() -> None:
    """Without a terminal, the Hub client's bars are off for the whole run (they would fill logs)."""
    if not bars_wanted():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


@contextmanager
def client_bars_off() -> Iterator[None]:
    """Switch the Hub client's bars off for a while, then back to what they were."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    were_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not were_disabled:
            enable_progress_bars()


class Phase:
    """One phase of a run with a known number of steps (``with Phase("Merging", 8) as phase:``).

    ``phase.step(label)`` after each step: the bar moves, or one line is logged.
    """

    def __init__(self, name: str, total: int, *, unit: str = "step"):
        self.name, self.total, self.unit, self.done = name, total, unit, 0
        self._bar: Any = None  # a tqdm bar while one is shown
        self._redirect: Any = None  # tqdm's logging redirect while a bar is shown
        self._client_bars = client_bars_off()

    def __enter__(self) -> Phase:
        global _active_phases
        _active_phases += 1
        self._client_bars.__enter__()
        if bars_wanted():
            import logging

            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # Log lines go above the bar instead of through it.
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger("hf_merge")])
            self._redirect.__enter__()
            self._bar = tqdm(total=self.total, desc=self.name, unit=self.unit, file=sys.stderr)
        return self

    def describe(self, label: str) -> None:
        """Say what the current step is working on (the bar's suffix; nothing is logged)."""
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=True)

    def step(self, label: str = "") -> None:
        """One step finished."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        else:
            logger.info("%s %d/%d%s", self.name, self.done, self.total, f": {label}" if label else "")

    def __exit__(self, *exc: Any) -> None:
        global _active_phases
        if self._bar is not None:
            self._bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(*exc)
        self._client_bars.__exit__(*exc)
        _active_phases -= 1
