"""Two processes under ``accelerate launch`` (CPU, gloo) merge exactly what one process merges, and
both reject an expert whose NaN only one of them reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from accelerate import PartialState
    import hf_merge.merging.methods.opcm as opcm
    from hf_merge.merging.engine import ContinualMerger, merge_weights as merge
    from hf_merge.errors import CheckpointError

    report, base, out, poisoned, last, *experts = sys.argv[1:]
    svds = []
    real = opcm.project_task_vector
    def counted(delta, tau, **kw):
        svds.append(1)
        return real(delta, tau, **kw)
    opcm.project_task_vector = counted
    result = merge(base, experts, "opcm", out)
    svd_count, lam = len(svds), result.steps[-1].metrics["lambda"]
    # A NaN that only the last process reads: every process must stop, undo and carry on.
    with ContinualMerger.resume(out) as merger:
        try:
            merger.add(poisoned)
            error = None
        except CheckpointError as err:
            error = str(err)
        merger.add(last)
    state = PartialState()
    Path(f"{report}.{state.process_index}.json").write_text(json.dumps({
        "num_processes": state.num_processes,
        "svds": svd_count,
        "lambda": lam,
        "error": error,
    }))
    """
)


@pytest.mark.slow
def test_two_processes_equal_one(tiny_base, tiny_experts, tmp_path):
    script = tmp_path / "merge_script.py"
    script.write_text(_SCRIPT)
    # Same BLAS thread count in both runs, so that even the last bit can be compared.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_experts[4], poisoned)
    tensors = load_file(str(poisoned / "model.safetensors"))
    tensors["visual_projection.weight"][0, 0] = float("nan")  # the last SVD tensor: the last process's share
    save_file(tensors, str(poisoned / "model.safetensors"))
    experts = [str(poisoned), str(tiny_experts[4])] + [str(e) for e in tiny_experts[:4]]
    single = [sys.executable, str(script), str(tmp_path / "one"), str(tiny_base), str(tmp_path / "out1"), *experts]
    subprocess.run(single, env=env, check=True, timeout=300)
    accelerate = Path(sys.executable).with_name("accelerate")
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no",
              str(script), str(tmp_path / "two"), str(tiny_base), str(tmp_path / "out2"), *experts]
    subprocess.run(launch, env=env, check=True, timeout=300)

    one = json.loads((tmp_path / "one.0.json").read_text())
    ranks = [json.loads((tmp_path / f"two.{i}.json").read_text()) for i in range(2)]
    assert one["num_processes"] == 1 and [r["num_processes"] for r in ranks] == [2, 2]
    # the SVDs were shared out, not repeated: each process did part, together all of them
    assert all(r["svds"] > 0 for r in ranks) and sum(r["svds"] for r in ranks) == one["svds"]
    assert ranks[0]["lambda"] == ranks[1]["lambda"] == one["lambda"]
    expected_error = "tensor 'visual_projection.weight' contains NaN or Inf values"
    assert expected_error in one["error"] and all(expected_error in r["error"] for r in ranks)

    merged1 = load_file(str(tmp_path / "out1" / "model.safetensors"))
    merged2 = load_file(str(tmp_path / "out2" / "model.safetensors"))
    assert merged1.keys() == merged2.keys()
    assert max(float((merged1[n] - merged2[n]).abs().max()) for n in merged1) < 1e-6
    state1 = json.loads((tmp_path / "out1" / "merge_state.json").read_text())
    state2 = json.loads((tmp_path / "out2" / "merge_state.json").read_text())
    assert state1["method_state"] == state2["method_state"] and state1["lineage"] == state2["lineage"]
    assert state1["step"] == 5 and not any("poisoned" in entry["name"] for entry in state1["lineage"])
