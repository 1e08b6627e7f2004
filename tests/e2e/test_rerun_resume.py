"""The same ``hf-merge merge`` command, run again after a SIGKILL, finishes the merge and the push."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from _cli import error_lines, hf_merge

from hf_merge.api import merge
from hf_merge.io.merge_folder import MergeFolder
from hf_merge.merging.state import MergeState
from hf_merge.testing.processes import sigkill_when
from hf_merge.testing.watch_models import lineage_of

pytestmark = pytest.mark.slow

# The CLI in a child process, held at a point so that the test can SIGKILL it there.
_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hf_merge.cli import main

    where, marker, *argv = sys.argv[1:]

    def hang(*args, **kwargs):
        Path(marker).write_text("now")
        time.sleep(600)

    if where == "step 3":
        from hf_merge.merging.methods.opcm import OPCM
        real = OPCM._partial_sum
        def partial_sum(self, name, expert, **kw):
            if self.step_count == 3:
                hang()
            return real(self, name, expert, **kw)
        OPCM._partial_sum = partial_sum
    else:  # every step written, the push under way
        import hf_merge.hub.push
        hf_merge.hub.push.push_merge = hang
    sys.exit(main(argv))
    """
)


def _killed_at(where: str, argv: list[str], tmp_path) -> None:
    marker = tmp_path / f"marker-{where.replace(' ', '-')}"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, where, str(marker), *argv], env=dict(os.environ))
    sigkill_when(child, marker, what=where)
    assert child.returncode == -signal.SIGKILL


def _argv(seeded_hub, experts, out, repo, token, method="opcm"):
    return ["merge", "--base", seeded_hub.base, "--experts", *experts, "--method", method, "--output", str(out),
            "--push-to-hub", repo, "--token", token, "-q"]


@pytest.fixture(scope="module")
def clean_four(seeded_hub, tmp_path_factory):
    return merge(base=seeded_hub.base, experts=seeded_hub.experts[:4], method="opcm",
                 output=str(tmp_path_factory.mktemp("clean") / "out")).output_dir


def test_rerun_after_a_kill_at_step_three_continues_and_pushes(seeded_hub, alice_token, clean_four, tmp_path):
    out, repo = tmp_path / "out", "alice/rerun-after-kill"
    argv = _argv(seeded_hub, seeded_hub.experts[:4], out, repo, alice_token)
    _killed_at("step 3", argv, tmp_path)
    assert MergeState.load(out).step == 2  # what the kill left

    rerun = hf_merge(argv)
    assert rerun.returncode == 0 and error_lines(rerun.stderr) == [], rerun.stderr
    assert lineage_of(repo) == [(e, seeded_hub.commits[e]) for e in seeded_hub.experts[:4]]
    assert (out / "model.safetensors").read_bytes() == (clean_four / "model.safetensors").read_bytes()
    # every parent's licence (the base and four experts) is kept in the merge state for later cards
    assert len(MergeFolder(out).licenses()) == 5


def test_rerun_with_every_step_done_only_pushes(seeded_hub, alice_token, hub_api, tmp_path):
    out, repo = tmp_path / "out", "alice/rerun-push-only"
    argv = _argv(seeded_hub, seeded_hub.experts[:2], out, repo, alice_token)
    _killed_at("push", argv, tmp_path)
    assert MergeState.load(out).step == 2 and not hub_api.repo_exists(repo)
    written = (out / "model.safetensors").stat().st_mtime_ns

    rerun = hf_merge(argv)
    assert rerun.returncode == 0 and error_lines(rerun.stderr) == [], rerun.stderr
    assert lineage_of(repo) == [(e, seeded_hub.commits[e]) for e in seeded_hub.experts[:2]]
    assert (out / "model.safetensors").stat().st_mtime_ns == written  # nothing merged again
    again = hf_merge(argv)  # and once more: nothing left to do, no error
    assert again.returncode == 0, again.stderr


def test_another_recipe_is_refused_with_the_command_to_run(seeded_hub, alice_token, tmp_path):
    out, repo = tmp_path / "out", "alice/rerun-other-recipe"
    merge(base=seeded_hub.base, experts=seeded_hub.experts[:2], method="opcm", output=str(out))
    other = hf_merge(_argv(seeded_hub, seeded_hub.experts[:3], out, repo, alice_token, method="average"))
    assert other.returncode == 2
    [line] = error_lines(other.stderr)
    assert "method 'opcm', not 'average'" in line
    assert f"`hf-merge add {out} --experts {seeded_hub.experts[2]} --push-to-hub {repo}`" in line
    swapped = hf_merge(_argv(seeded_hub, [seeded_hub.experts[1], seeded_hub.experts[0]], out, repo, alice_token))
    assert swapped.returncode == 2
    [line] = error_lines(swapped.stderr)
    assert f"`hf-merge push {out} --repo-id {repo}`" in line and "step 1 merged" in line
