"""`hf-merge eval` on a repo id, through the local Hub server."""

from __future__ import annotations

import json

from hf_merge.cli import main
from hf_merge.evaluation import evaluate_model


def test_eval_a_hub_repo_equals_the_local_folder(seeded_hub, tmp_path):
    output = tmp_path / "results.json"
    code = main(["eval", f"{seeded_hub.base}@main", "--tasks", "synthetic/colors", "--limit", "16",
                 "--output", str(output), "--device", "cpu", "-q"])
    assert code == 0
    from_hub = json.loads(output.read_text())["results"]["synthetic/colors"]
    local = evaluate_model(seeded_hub.base_dir, ["synthetic/colors"], limit=16, device="cpu")["synthetic/colors"]
    assert from_hub == local
    assert main(["eval", "alice/no-such-model", "--tasks", "synthetic/colors", "-q"]) == 1
