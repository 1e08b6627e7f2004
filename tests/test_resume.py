"""Continuing a merge: from a saved state, and after the process was killed mid-step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from hf_merge.errors import MergeStateError
from hf_merge.merging.engine import ContinualMerger
from hf_merge.merging.engine import merge_weights as merge
from hf_merge.merging.state import MergeState
from hf_merge.testing.processes import sigkill_when


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def clean_runs(tiny_base, tiny_experts, tmp_path_factory):
    root = tmp_path_factory.mktemp("clean-runs")
    return {m: merge(tiny_base, tiny_experts[:5], m, root / m).output_dir for m in ("opcm", "magmax", "ties", "average")}


def assert_same_merge(folder, reference) -> None:
    got, expected = files(folder), files(reference)
    assert sorted(got) == sorted(expected)
    for name in expected:
        if name != "merge_state.json":
            assert got[name] == expected[name], name
    left, right = MergeState.load(folder), MergeState.load(reference)
    assert (left.step, left.lineage, left.method_state, left.hyperparameters) == (
        right.step, right.lineage, right.method_state, right.hyperparameters
    )


@pytest.mark.parametrize("method", ["opcm", "magmax", "ties", "average"])
def test_three_then_two_more_equals_five_at_once(method, tiny_base, tiny_experts, clean_runs, tmp_path):
    out = tmp_path / "out"
    merge(tiny_base, tiny_experts[:3], method, out)
    merger = ContinualMerger.resume(out)  # base found again from the saved state
    assert merger.step == 3 and merger.method.name == method
    merger.add_all(tiny_experts[3:5])
    assert_same_merge(out, clean_runs[method])


def test_resume_refuses_a_folder_without_state(tiny_base, tmp_path):
    with pytest.raises(MergeStateError, match="no merge state"):
        ContinualMerger.resume(tmp_path, base=tiny_base)


_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from hf_merge.merging.engine import merge_weights as merge
    from hf_merge.merging.methods.opcm import OPCM

    where, marker, base, out, *experts = sys.argv[1:]

    def hang():
        Path(marker).write_text("now")
        time.sleep(600)

    if where == "computing":
        real = OPCM._partial_sum
        def partial_sum(self, name, expert, **kw):
            if self.step_count == 4 and name.endswith("layers.1.mlp.fc1.weight"):
                hang()
            return real(self, name, expert, **kw)
        OPCM._partial_sum = partial_sum
    else:  # the commit point has passed: weights moved, merge_state.json not yet
        real_replace = os.replace
        def replace(src, dst):
            if ".hf-merge-pending" in str(src) and str(dst).endswith("merge_state.json") and json.loads(Path(src).read_text())["step"] == 4:
                hang()
            return real_replace(src, dst)
        os.replace = replace
    merge(base, experts, "opcm", out)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["computing", "committing"])
def test_sigkill_during_step_four_then_resume_equals_clean_run(where, tiny_base, tiny_experts, clean_runs, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "marker"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, where, str(marker), str(tiny_base), str(out), *map(str, tiny_experts[:5])],
        env=env,
    )
    sigkill_when(child, marker)
    assert child.returncode == -signal.SIGKILL

    merger = ContinualMerger.resume(out)
    expected_step = 3 if where == "computing" else 4  # a committed step is rolled forward
    assert merger.step == expected_step
    assert not [p for p in out.iterdir() if p.name in (".hf-merge-staging", ".hf-merge-pending")]
    merger.add_all(tiny_experts[merger.step : 5])
    assert_same_merge(out, clean_runs["opcm"])
