"""Killing a child process at a chosen moment, for crash-and-resume tests."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def sigkill_when(child: subprocess.Popen, marker: Path, *, timeout: float = 240.0, what: str = "step 4") -> None:
    """Wait until ``child`` creates ``marker``, then SIGKILL it and reap it (the child is killed
    anyway if waiting fails); asserts that it got that far within ``timeout`` seconds."""
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert child.poll() is None, f"the merge process ended before {what}"
            assert time.monotonic() < deadline, f"{what} never started"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
