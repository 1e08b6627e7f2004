"""The README's commands that name Hub repos, run verbatim against replicas of those repos.

A local Hub of its own holds small replicas of ``openai/clip-vit-base-patch32`` (pickle on
``main``, safetensors in the conversion pull request ``refs/pr/66``), the eight
``tanganke/clip-vit-base-patch32_<task>`` ``CLIPVisionModel`` experts and the eight evaluation
datasets (:mod:`hf_merge.testing.replicas`). Each README code block runs in a shell (brace
expansion included) in a fresh folder holding a copy of ``examples/``; the only substitutions:
``YOUR-USER`` becomes the test user, ``pip install -e .`` is skipped (the package is installed)
and ``hf auth login`` is replaced by ``HF_TOKEN`` in the environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_merge.hub_server import LocalHubServer
from hf_merge.testing.replicas import PLACEHOLDER, publish_replicas

ROOT = Path(__file__).resolve().parents[2]
USER = "paper-user"
TOKEN = "hf_paper_user_8d0c55e1a7b94e2f"
pytestmark = pytest.mark.slow  # about 20 subprocess runs, most of them evaluating 8 tasks every step
PAPER_SECTION = "## With the real Hub: the paper's 8-task ViT-B/32 experiment"


def readme_blocks(heading: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README section that starts with ``heading``."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines(keepends=True)
    level = len(heading) - len(heading.lstrip("#"))
    section, inside, fenced = [], False, False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        is_heading = not fenced and re.match(rf"#{{1,{level}}} ", line)
        if inside and is_heading:
            break
        inside = inside or line.rstrip("\n") == heading
        if inside:
            section.append(line)
    assert section, heading
    section = "".join(section)
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    commands, current = [], ""
    for line in block.splitlines():
        code = line.split("  #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not code and not current:
            continue
        current += code.rstrip("\\").rstrip() + " " if code.endswith("\\") else code
        if not code.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return [c for c in commands if c]


@pytest.fixture(scope="module")
def replica_hub(tmp_path_factory):
    server = LocalHubServer(tmp_path_factory.mktemp("replica-hub"), tokens={USER: TOKEN}).start()
    cache = Path(tempfile.gettempdir()) / "hf-merge-replicas"
    replicas = publish_replicas(server.api.storage, cache)
    home = tmp_path_factory.mktemp("hf-home")
    env = {
        **os.environ,
        "HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN, "HF_HOME": str(home),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    yield server, replicas, env, home
    server.stop()


def run_block(commands: list[str], env: dict, cwd: Path) -> list[subprocess.CompletedProcess]:
    done = []
    for command in commands:
        if command.startswith("pip install -e ."):
            continue  # installed already
        if command == "hf auth login":
            assert env["HF_TOKEN"]  # the login's token, from the environment
            continue
        command = command.replace("YOUR-USER", USER)
        process = subprocess.run(["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
        assert process.returncode == 0, f"{command}\n{process.stderr[-3000:]}"
        done.append(process)
    return done


def fresh_folder(tmp_path_factory, name: str) -> Path:
    folder = tmp_path_factory.mktemp(name)
    shutil.copytree(ROOT / "examples", folder / "examples")
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def paper_run(replica_hub, tmp_path_factory):
    """The paper section's bash block, every command, in one folder."""
    server, replicas, env, home = replica_hub
    # the subsection "Reproducing the published 75.5 %" has its own block and its own test
    reproduction = readme_blocks(REPRODUCTION_SECTION, "bash")
    blocks = [block for block in readme_blocks(PAPER_SECTION, "bash") if block not in reproduction]
    assert len(blocks) == 1
    commands = shell_commands(blocks[0])
    assert any("{sun397,stanford-cars," in c for c in commands)  # brace expansion, as a shell does it
    cwd = fresh_folder(tmp_path_factory, "paper")
    run_block(commands, env, cwd)
    return cwd, replicas, server, home


def test_paper_merge_is_a_full_clip_with_the_base_text_tower(paper_run):
    cwd, replicas, _, _ = paper_run
    base = load_file(replicas.folder / replicas.base / "pr" / "model.safetensors")
    merged = tensors(cwd / "clip-vit-b32-tsv-m-8tasks")
    assert set(merged) == set(base)
    for name, tensor in base.items():
        if name.startswith("vision_model.") and tensor.is_floating_point():
            continue
        assert torch.equal(merged[name], tensor), name  # text tower, projections, logit_scale, buffers
    changed = [n for n in base if n.startswith("vision_model.") and not torch.equal(merged[n], base[n])]
    assert len(changed) > 30


def test_paper_merge_records_the_conversion_pr_and_eight_steps(paper_run):
    cwd, replicas, _, _ = paper_run
    out = cwd / "clip-vit-b32-tsv-m-8tasks"
    state = json.loads((out / "merge_state.json").read_text())
    pr = state["base"]["conversion_pr"]
    assert state["base"]["commit_sha"] == pr["commit_sha"] == replicas.pr_sha
    assert pr["ref"] == "refs/pr/66" and pr["revision_commit"] == replicas.main_sha
    assert [e["repo_id"] for e in state["lineage"]] == replicas.experts
    assert [e["commit_sha"] for e in state["lineage"]] == [replicas.expert_shas[r] for r in replicas.experts]
    assert state["from_base"] == {"visual_projection.weight": "the expert does not have it: it is a CLIPVisionModel"}
    card = (out / "README.md").read_text()
    assert replicas.pr_sha in card and "refs/pr/66" in card and replicas.main_sha in card
    assert "`visual_projection.weight`: the expert does not have it: it is a CLIPVisionModel" in card
    results = json.loads((out / "eval_results.json").read_text())
    assert len(results["steps"]) == 8 and len(results["accuracy_matrix"]) == 8
    experts, zero_shot = results["expert_accuracy"], results["base_accuracy"]
    assert sum(experts) / 8 > sum(zero_shot) / 8 + 0.3  # the replicas' experts did learn their task


def test_paper_baselines_and_orders_ran(paper_run):
    cwd, replicas, _, _ = paper_run
    expected = {"clip-vit-b32-tsv-m-8tasks": "tsv_m", "b32-opcm-no-eval": "opcm", "b32-opcm": "opcm", "b32-average": "average",
                "b32-ta": "task_arithmetic",
                "b32-ties": "ties", "b32-magmax": "magmax", "b32-iso-c": "iso_c", "b32-dop": "dop",
                "b32-opcm-seed1": "opcm", "b32-iso-cts": "iso_cts", "b32-wudi": "wudi", "b32-tsv-m-tuned": "tsv_m"}
    for folder, method in expected.items():
        state = json.loads((cwd / folder / "merge_state.json").read_text())
        assert state["method"] == method and state["step"] == 8, folder
    # the methods that keep state besides the weights saved it, and moved the encoder's weights
    base = load_file(replicas.folder / replicas.base / "pr" / "model.safetensors")
    for folder in ("b32-iso-c", "clip-vit-b32-tsv-m-8tasks"):
        assert (cwd / folder / "merge_state.safetensors").is_file(), folder
        merged = tensors(cwd / folder)
        assert torch.equal(merged["text_projection.weight"], base["text_projection.weight"]), folder
        name = "vision_model.encoder.layers.0.mlp.fc1.weight"
        assert not torch.allclose(merged[name], base[name]), folder
    for folder in ("b32-iso-cts", "b32-wudi"):  # all at once: every expert in the lineage, the final model evaluated once
        state = json.loads((cwd / folder / "merge_state.json").read_text())
        assert [e["step"] for e in state["lineage"]] == list(range(1, 9)), folder
        assert [row["step"] for row in json.loads((cwd / folder / "eval_results.json").read_text())["steps"]] == [8]
    assert json.loads((cwd / "b32-iso-cts" / "merge_state.json").read_text())["hyperparameters"]["scaling_factor"] == 1.5
    shuffled = json.loads((cwd / "b32-opcm-seed1" / "merge_state.json").read_text())
    assert [e["repo_id"] for e in shuffled["lineage"]] != [
        e["repo_id"] for e in json.loads((cwd / "b32-average" / "merge_state.json").read_text())["lineage"]
    ]


def test_paper_tuned_run_chose_each_step_on_held_out_train_images(paper_run):
    """``--tune`` on the paper's tasks: every step tried TSV-M's grid and scored it on each task's
    held-out 10 % of its train split (FusionBench's validation recipe), never on the test split."""
    cwd, _, _, _ = paper_run
    state = json.loads((cwd / "b32-tsv-m-tuned" / "merge_state.json").read_text())
    records = state["tuning"]
    assert [r["step"] for r in records] == list(range(1, 9))
    tasks = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    for record in records:
        assert record["grid"] == [0.6, 0.8, 1.0, 1.2, 1.5, 1.8, 2.0]
        assert record["chosen"] == record["grid"][record["scores"].index(max(record["scores"]))]
        assert set(record["per_task"][0]) == {f"{task}/val" for task in tasks[:record["step"]]}
    assert state["hyperparameters"]["scaling_factor"] == records[-1]["chosen"]
    assert "### Hyperparameters chosen on validation data" in (cwd / "b32-tsv-m-tuned" / "README.md").read_text()


def test_paper_dop_ran_at_the_reference_settings(paper_run):
    """The README's DOP line runs as written (200 Adam steps per layer: the replicas are small) and
    its output shows the reference's choices: class_embedding back at θ0, the linear weights moved."""
    cwd, replicas, _, _ = paper_run
    state = json.loads((cwd / "b32-dop" / "merge_state.json").read_text())
    assert state["hyperparameters"]["num_steps"] == 200 and state["hyperparameters"]["alpha"] == 0.8
    assert len(state["method_state"]["stability"]) == 7  # one mean MGDA weight per step after the first
    assert all(0.0 < w < 1.0 for w in state["method_state"]["stability"])
    base = load_file(replicas.folder / replicas.base / "pr" / "model.safetensors")
    merged, average = tensors(cwd / "b32-dop"), tensors(cwd / "b32-average")
    assert torch.equal(merged["vision_model.embeddings.class_embedding"], base["vision_model.embeddings.class_embedding"])
    fc1 = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(merged[fc1], average[fc1]) and not torch.equal(merged[fc1], base[fc1])
    results = json.loads((cwd / "b32-dop" / "eval_results.json").read_text())
    assert len(results["steps"]) == 8


def test_pushed_model_loads_with_pipeline_and_space_exists(paper_run):
    cwd, _, server, home = paper_run
    script = (
        "from PIL import Image\nfrom transformers import pipeline\n"
        f"c = pipeline('zero-shot-image-classification', model='{USER}/clip-vit-b32-tsv-m-8tasks')\n"
        "r = c(Image.new('RGB', (64, 64), 'red'), candidate_labels=['a photo of a cat', 'a photo of a red square'])\n"
        "print(sorted(x['label'] for x in r), round(sum(x['score'] for x in r), 4))\n"
    )
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home / "pipeline")}
    process = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.strip().endswith("['a photo of a cat', 'a photo of a red square'] 1.0")
    assert server.api.storage.get_repo("space", f"{USER}/clip-vit-b32-tsv-m-8tasks") is not None


def test_flax_tf_and_pickle_weights_were_never_downloaded(paper_run):
    _, _, _, home = paper_run
    downloaded = [p for p in (home / "hub").rglob("*") if p.is_file()]
    assert downloaded
    names = {p.name for p in downloaded}
    assert not names & {"flax_model.msgpack", "tf_model.h5", "pytorch_model.bin"}
    assert not any(p.read_bytes() == PLACEHOLDER for p in downloaded if p.stat().st_size == len(PLACEHOLDER))


def test_readme_command_line_and_python_api_against_replicas(replica_hub, tmp_path_factory):
    """Every other README block that names a Hub repo: Merge, A recipe, Continue, Python API,
    Evaluation and The Space (``space run`` aside: it serves until stopped)."""
    server, replicas, env, _ = replica_hub
    storage = server.api.storage
    (merge_block,) = readme_blocks("### Merge", "bash")
    run_block(shell_commands(merge_block), env, fresh_folder(tmp_path_factory, "merge"))
    repo = f"{USER}/clip-vit-b32-opcm"
    first = storage.read_refs("model", repo).branches["main"]

    recipe_yaml, recipe_bash = readme_blocks("### A recipe", "yaml")[0], readme_blocks("### A recipe", "bash")[0]
    folder = fresh_folder(tmp_path_factory, "recipe")
    (folder / "recipe.yaml").write_text(recipe_yaml.replace("YOUR-USER", USER))
    run_block(shell_commands(recipe_bash), env, folder)
    assert storage.read_refs("model", repo).branches["main"] != first

    # The two `add` lines are two separate continuations of the repo (each downloads it afresh).
    for command in shell_commands(readme_blocks("### Continue a merged model", "bash")[0]):
        run_block([command], env, fresh_folder(tmp_path_factory, "continue"))
    refs = storage.read_refs("model", repo)
    assert refs.pull_requests  # the --create-pr continuation
    state_file = storage.resolve_revision("model", repo, "main").tree["merge_state.json"]
    lineage = [e["repo_id"] for e in json.loads(storage.read_content(state_file))["lineage"]]
    assert lineage == ["tanganke/clip-vit-base-patch32_sun397", "tanganke/clip-vit-base-patch32_stanford-cars",
                       "tanganke/clip-vit-base-patch32_mnist"]

    python_blocks = readme_blocks("## Python API", "python")
    folder = fresh_folder(tmp_path_factory, "python-api")
    for block in python_blocks:
        script = block.replace("YOUR-USER", USER) + "\nprint('block done')\n"
        process = subprocess.run([sys.executable, "-c", script], env=env, cwd=folder, capture_output=True, text=True, timeout=1200)
        assert process.returncode == 0, process.stderr[-3000:]
        assert process.stdout.strip().endswith("block done")
    for name in ("clip-opcm", "clip-opcm-8"):
        assert storage.get_repo("model", f"{USER}/{name}") is not None
    continued = storage.resolve_revision("model", f"{USER}/clip-opcm", "main").tree["merge_state.json"]
    assert json.loads(storage.read_content(continued))["step"] == 3

    folder = fresh_folder(tmp_path_factory, "eval-space")
    hub_commands = [c for block in readme_blocks("## Evaluation", "bash") + readme_blocks("## The Space", "bash")
                    for c in shell_commands(block) if "YOUR-USER/" in c and " space run " not in c]
    assert any(c.startswith("hf-merge eval") for c in hub_commands) and any("space publish" in c for c in hub_commands)
    done = run_block(hub_commands, env, folder)
    assert "sun397" in done[0].stdout
    assert storage.get_repo("space", f"{USER}/clip-opcm") is not None


def test_readme_community_pull_request_against_replicas(tmp_path_factory):
    """"Continue a merged model": another user's ``add --create-pr`` on someone's merged repo opens a
    pull request authored by that user, and leaves ``main`` as it was."""
    owner, owner_token = "someone", "hf_someone_3c1e5f0a9d2b4c7e"
    server = LocalHubServer(tmp_path_factory.mktemp("community-hub"), tokens={USER: TOKEN, owner: owner_token}).start()
    try:
        publish_replicas(server.api.storage, Path(tempfile.gettempdir()) / "hf-merge-replicas")
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": owner_token,
               "HF_HOME": str(tmp_path_factory.mktemp("hf-home-owner")), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        (merge_block,) = readme_blocks("### Merge", "bash")  # the owner's merged model
        owner_commands = [c.replace("YOUR-USER", owner) for c in shell_commands(merge_block)]
        run_block(owner_commands, env, fresh_folder(tmp_path_factory, "owner"))
        repo = f"{owner}/clip-vit-b32-opcm"
        storage = server.api.storage
        main_before = storage.read_refs("model", repo).branches["main"]

        proposal = shell_commands(readme_blocks("### Continue a merged model", "bash")[1])
        assert len(proposal) == 1 and proposal[0].startswith("hf-merge add SOMEONE/")
        visitor = {**env, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path_factory.mktemp("hf-home-visitor"))}
        run_block([proposal[0].replace("SOMEONE", owner)], visitor, fresh_folder(tmp_path_factory, "visitor"))

        refs = storage.read_refs("model", repo)
        assert refs.branches["main"] == main_before  # only the owner merges
        (number,) = refs.pull_requests
        from huggingface_hub import HfApi

        discussion = HfApi(endpoint=server.url, token=owner_token).get_discussion_details(repo, int(number))
        assert discussion.is_pull_request and discussion.author == USER and discussion.status == "open"
        pr_state = storage.resolve_revision("model", repo, f"refs/pr/{number}").tree["merge_state.json"]
        lineage = [e["repo_id"] for e in json.loads(storage.read_content(pr_state))["lineage"]]
        assert lineage[-1] == "tanganke/clip-vit-base-patch32_eurosat" and len(lineage) == 3
    finally:
        server.stop()


def test_readme_watch_commands_against_replicas(replica_hub, tmp_path_factory):
    """"Keep a merged model up to date": the one-pass commands and the watcher Space, verbatim
    (``--interval`` and ``--webhook`` aside: they serve until stopped). The replicas' experts carry
    the real cards' ``base_model: openai/clip-vit-base-patch32``, so the Hub lists them as its fine-tunes."""
    server, replicas, env, _ = replica_hub
    storage = server.api.storage
    repo = f"{USER}/clip-vit-b32-opcm"
    (merge_block,) = readme_blocks("### Merge", "bash")
    run_block(shell_commands(merge_block), env, fresh_folder(tmp_path_factory, "watch-merge"))
    section = "## Keep a merged model up to date"
    commands = [c for c in shell_commands(readme_blocks(section, "bash")[0]) if "--interval" not in c and "--webhook" not in c]
    assert len(commands) == 3 and "--once" in commands[0] and "publish-space" in commands[2]
    folder = fresh_folder(tmp_path_factory, "watch")
    (folder / "policy.yaml").write_text(readme_blocks(section, "yaml")[0].replace("YOUR-USER", USER))
    (folder / "finetunes.txt").write_text("tanganke/clip-vit-base-patch32_gtsrb\n")
    done = run_block(commands, env, folder)

    state_file = storage.resolve_revision("model", repo, "main").tree["merge_state.json"]
    lineage = [e["repo_id"] for e in json.loads(storage.read_content(state_file))["lineage"]]
    experts = [f"tanganke/clip-vit-base-patch32_{t}" for t in
               ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")]
    assert lineage[:2] == [experts[0], experts[7]]  # what the Merge block merged
    assert sorted(lineage) == sorted(experts)  # the first pass merged the other six fine-tunes of the base
    assert sum(line.startswith("merged ") for line in done[0].stdout.splitlines()) == 6
    assert storage.get_repo("space", f"{USER}/clip-watcher") is not None


REPRODUCTION_SECTION = "### Reproducing the published 75.5 %"


def test_paper_reproduction_commands_against_replicas(replica_hub, tmp_path_factory):
    """The reproduction block, verbatim but for 2 task orders instead of 10: the first release
    (``--no-zero-diagonal``) and the corrected default, on full test splits, with their means."""
    _, _, env, _ = replica_hub
    (block,) = readme_blocks(REPRODUCTION_SECTION, "bash")
    commands = shell_commands(block)
    assert sum("for seed in 0 1 2 3 4 5 6 7 8 9;" in c for c in commands) == 2 and not any("--eval-limit" in c for c in commands)
    cwd = fresh_folder(tmp_path_factory, "reproduction")
    done = run_block([c.replace("0 1 2 3 4 5 6 7 8 9", "0 1") for c in commands], env, cwd)
    for variant, zero_diagonal, printed in (("first-release", False, done[1]), ("corrected", True, done[3])):
        finals, orders = [], []
        for seed in (0, 1):
            out = cwd / f"b32-opcm-{variant}-{seed}"
            state = json.loads((out / "merge_state.json").read_text())
            assert state["hyperparameters"]["zero_diagonal"] is zero_diagonal and state["step"] == 8
            orders.append([e["repo_id"] for e in state["lineage"]])
            results = json.loads((out / "eval_results.json").read_text())
            assert results["limit"] is None and len(results["accuracy_matrix"]) == 8  # full splits, every step
            assert results["eval_dtype"] == "float32" and "PIL" in results["preprocessing"]
            assert all(v is not None for v in results["base_accuracy"] + results["expert_accuracy"])
            finals.append(results["average_accuracy"])
        assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])
        assert printed.stdout.strip() == f"{100 * sum(finals) / 2:.1f} % over 2 orders"
    # Same order, the two releases: the no-op zeroing gives other weights.
    first, corrected = tensors(cwd / "b32-opcm-first-release-0"), tensors(cwd / "b32-opcm-corrected-0")
    assert any(not torch.equal(first[n], corrected[n]) for n in first if n.startswith("vision_model."))
