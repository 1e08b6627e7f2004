"""benchmarks/gpu_check.sh on a machine without CUDA: one clear line and status 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_without_cuda_exits_with_a_clear_message(tmp_path):
    results = tmp_path / "gpu_check.md"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--results", str(results)],
        env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing measured"
    assert not results.exists()
