"""Running ``hf-merge`` as a user does: a separate process, talking to the session's local Hub."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# A fraction of the colour task keeps evaluation cheap while still exercising every step.
EVAL_LIMIT = "8"
TASK = "synthetic/colors"


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


def hf_merge(args: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 300) -> Completed:
    """Run ``hf-merge ARGS`` in a subprocess (inheriting HF_ENDPOINT etc. from the test session)."""
    environment = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    process = subprocess.run(
        [sys.executable, "-m", "hf_merge.cli", *args],
        capture_output=True, text=True, env=environment, cwd=cwd, timeout=timeout,
    )
    return Completed(process.returncode, process.stdout, process.stderr)


def error_lines(stderr: str) -> list[str]:
    """The lines hf-merge printed as its error (logging and warnings from libraries aside)."""
    return [line for line in stderr.splitlines() if line.startswith("hf-merge:")]


def state_dict(model_dir_or_repo: str | Path) -> dict[str, torch.Tensor]:
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(model_dir_or_repo)).state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=atol, rtol=0), name
