"""``checkpoint_every``: which steps are written, and that a crash between checkpoints resumes to
the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file, save_file

from hf_merge.cli import build_parser
from hf_merge.cli.merge import _recipe_fields
from hf_merge.errors import CheckpointError, RecipeError, UsageError
from hf_merge.merging.engine import ContinualMerger
from hf_merge.merging.engine import merge_weights as merge
from hf_merge.merging.state import MergeState
from hf_merge.recipe import EvalSpec, MergeRecipe
from hf_merge.testing.processes import sigkill_when


def weight_bytes(folder) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def crash_merge_at_step(merger, step, experts, monkeypatch) -> None:
    """Run ``merger`` over ``experts`` with its method raising in ``step``, as a crash would stop it."""
    real = type(merger.method)._step

    def crashing(self, expert):
        if self.step_count == step:
            raise RuntimeError("simulated crash")
        return real(self, expert)

    monkeypatch.setattr(type(merger.method), "_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        with merger:
            merger.add_all(experts)
    monkeypatch.setattr(type(merger.method), "_step", real)


@pytest.fixture(scope="module")
def every_step(tiny_base, tiny_experts, tmp_path_factory):
    """Uninterrupted 5-expert merges that write every step."""
    root = tmp_path_factory.mktemp("every-step")
    return {m: merge(tiny_base, tiny_experts[:5], m, root / m, checkpoint_every=1).output_dir for m in ("opcm", "average")}


@pytest.mark.parametrize("method", ["opcm", "average"])
def test_only_due_steps_and_the_last_are_written_with_the_same_result(method, tiny_base, tiny_experts, every_step, tmp_path):
    written = []
    out = tmp_path / "out"
    with ContinualMerger(tiny_base, out, method, checkpoint_every=3, on_step=lambda step, *_: written.append(step)) as merger:
        results = merger.add_all(tiny_experts[:5])
    assert written == [3, 5]
    assert [r.save_seconds > 0 for r in results] == [False, False, True, False, True]
    assert weight_bytes(out) == weight_bytes(every_step[method])
    assert MergeState.load(out).step == 5


@pytest.mark.parametrize("method", ["opcm", "ties", "magmax"])
def test_the_method_policy_leaves_the_first_step_to_the_next_write(method, tiny_base, tiny_experts, tmp_path):
    """Step 1 copies or scales θ_1: under the method's own policy it is written with step 2, or
    alone when it is the last; an explicit ``checkpoint_every`` or an ``on_step`` writes it."""
    with ContinualMerger(tiny_base, tmp_path / "policy", method) as merger:
        results = merger.add_all(tiny_experts[:3])
    assert [r.save_seconds > 0 for r in results] == [False, True, True]
    explicit = merge(tiny_base, tiny_experts[:3], method, tmp_path / "explicit", checkpoint_every=1)
    assert [r.save_seconds > 0 for r in explicit.steps] == [True, True, True]
    assert weight_bytes(tmp_path / "policy") == weight_bytes(tmp_path / "explicit")
    watched = []
    merge(tiny_base, tiny_experts[:2], method, tmp_path / "watched", on_step=lambda step, *_: watched.append(step))
    assert watched == [1, 2]
    alone = merge(tiny_base, tiny_experts[:1], method, tmp_path / "alone")
    assert alone.steps[0].save_seconds > 0 and MergeState.load(tmp_path / "alone").step == 1


def test_a_crash_in_step_two_under_the_method_policy_leaves_no_merge_to_resume(tiny_base, tiny_experts, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_merge_at_step(ContinualMerger(tiny_base, out, "opcm"), 2, tiny_experts[:3], monkeypatch)
    # nothing was committed, so the same command starts over in the same folder
    assert not (out / "merge_state.json").exists()
    assert merge(tiny_base, tiny_experts[:3], "opcm", out).state.step == 3


def test_method_defaults_and_explicit_values(tiny_base, tmp_path):
    assert ContinualMerger(tiny_base, tmp_path / "a", "opcm").checkpoint_every == 1
    assert ContinualMerger(tiny_base, tmp_path / "b", "average").checkpoint_every > 1
    assert ContinualMerger(tiny_base, tmp_path / "c", "average", checkpoint_every=1).checkpoint_every == 1
    for bad in (0, -2, 1.5, True):
        with pytest.raises(UsageError, match="checkpoint_every must be a positive integer"):
            ContinualMerger(tiny_base, tmp_path / "d", "average", checkpoint_every=bad)


@pytest.mark.parametrize("method", ["opcm", "average"])
def test_crash_between_checkpoints_resumes_from_the_last_written_step(method, tiny_base, tiny_experts, every_step, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_merge_at_step(ContinualMerger(tiny_base, out, method, checkpoint_every=2), 5, tiny_experts[:5], monkeypatch)
    assert MergeState.load(out).step == 4  # steps 2 and 4 were written; 5 never finished
    resumed = ContinualMerger.resume(out)
    assert resumed.step == 4
    with resumed:
        resumed.add_all(tiny_experts[4:5])
    assert weight_bytes(out) == weight_bytes(every_step[method])


def test_unwritten_steps_are_lost_at_a_crash_and_merged_again(tiny_base, tiny_experts, every_step, tmp_path, monkeypatch):
    out = tmp_path / "out"
    merger = ContinualMerger(tiny_base, out, "average", checkpoint_every=3)
    real = type(merger.method)._step

    def crashing(self, expert):
        if self.step_count == 5:
            raise KeyboardInterrupt
        return real(self, expert)

    monkeypatch.setattr(type(merger.method), "_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        with merger:
            merger.add_all(tiny_experts[:5])
    monkeypatch.setattr(type(merger.method), "_step", real)
    resumed = ContinualMerger.resume(out)
    assert resumed.step == 3  # step 4 was merged in memory only
    with resumed:
        resumed.add_all(tiny_experts[3:5])
    assert weight_bytes(out) == weight_bytes(every_step["average"])


def test_nan_midway_with_unwritten_steps_rolls_back_to_the_written_step(tiny_base, tiny_experts, every_step, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_experts[5], poisoned)
    tensors = load_file(poisoned / "model.safetensors")
    tensors["visual_projection.weight"][0, 0] = float("nan")  # read last: the step is half done
    save_file(tensors, poisoned / "model.safetensors")
    out = tmp_path / "out"
    with ContinualMerger(tiny_base, out, "average", checkpoint_every=3) as merger:
        merger.add_all(tiny_experts[:3])  # written at 3
        merger.add(tiny_experts[3])  # in memory only
        with pytest.raises(CheckpointError, match=r"back at its last written step 3, so the 1 expert\(s\)"):
            merger.add(poisoned)
        assert merger.step == 3 and merger.unwritten_steps == 0
        assert [s["step"] for s in merger.state.lineage] == [1, 2, 3]
        merger.add_all(tiny_experts[3:5])
    assert weight_bytes(out) == weight_bytes(every_step["average"])


def test_recipe_and_cli_carry_checkpoint_every(tmp_path):
    recipe = MergeRecipe(base="org/base", experts=["org/a", "org/b"], checkpoint_every=4)
    assert MergeRecipe.from_yaml(recipe.to_yaml()).checkpoint_every == 4
    assert "checkpoint_every" not in MergeRecipe(base="org/base", experts=["org/a"]).to_dict()
    for bad in (0, "3", True):
        with pytest.raises(RecipeError, match="`checkpoint_every` must be a positive integer"):
            MergeRecipe(base="org/base", experts=["org/a"], checkpoint_every=bad)
    with pytest.raises(RecipeError, match="needs `checkpoint_every: 1`"):
        MergeRecipe(base="org/base", experts=["org/a"], checkpoint_every=2, eval=EvalSpec(tasks=["x"], every_step=True))
    args = build_parser().parse_args(["merge", "--base", "org/base", "--experts", "org/a", "--checkpoint-every", "5"])
    assert _recipe_fields(args)["checkpoint_every"] == 5


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hf_merge.merging.engine import merge_weights as merge
    from hf_merge.merging.methods.average import ContinualAverage

    marker, base, out, *experts = sys.argv[1:]
    real = ContinualAverage._step
    def step(self, expert):
        if self.step_count == 4:
            Path(marker).write_text("now")
            time.sleep(600)
        return real(self, expert)
    ContinualAverage._step = step
    merge(base, experts, "average", out, checkpoint_every=3)
    """
)


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_equals_clean_run(tiny_base, tiny_experts, every_step, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "marker"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(marker), str(tiny_base), str(out), *map(str, tiny_experts[:5])],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    sigkill_when(child, marker)
    resumed = ContinualMerger.resume(out)
    assert resumed.step == 3
    with resumed:
        resumed.add_all(tiny_experts[3:5])
    assert weight_bytes(out) == weight_bytes(every_step["average"])
