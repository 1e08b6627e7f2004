"""The package installs next to a user's torch: pyproject declares a range, the exact CPU pin lives
only in the Makefile's set-up, and the pinned (tested) version lies inside the range."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirement(name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (found,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == name]
    return found


def test_torch_is_a_range_with_the_makefile_pin_inside():
    torch = _requirement("torch")
    assert not any(spec.operator in ("==", "===", "~=") for spec in torch.specifier), str(torch)
    assert Version("2.6") in torch.specifier and Version("2.5.1") not in torch.specifier
    pins = re.findall(r"pip install -q torch==([0-9.]+)", (ROOT / "Makefile").read_text(encoding="utf-8"))
    assert len(pins) == 1 and Version(pins[0]) in torch.specifier


def test_the_lower_bound_is_what_the_code_and_transformers_need():
    from importlib.metadata import requires

    import torch

    # torch.accelerator (merging/distributed.py) arrived in torch 2.6.
    assert "torch.accelerator.is_available()" in (ROOT / "hf_merge" / "merging" / "distributed.py").read_text()
    assert hasattr(torch, "accelerator")
    transformers_needs = [Requirement(r) for r in requires("transformers") or [] if r.startswith("torch>")]
    assert transformers_needs and all(str(r.specifier) == ">=2.6" for r in transformers_needs)
