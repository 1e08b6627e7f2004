"""``hf-merge watch publish-space``: the watcher as a Space, and the command line's usage errors."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download

from hf_merge.cli import main
from hf_merge.errors import UsageError

SPACE = "alice/tiny-clip-merged-watcher"


@pytest.fixture(scope="module")
def published(seeded_merged_repo, alice_token, tmp_path_factory):
    policy = tmp_path_factory.mktemp("watch-space") / "policy.yaml"
    policy.write_text("watch:\n  licenses: [mit]\n  max_forgetting: 2\n")
    code = main(["watch", "publish-space", seeded_merged_repo, "--space", SPACE, "--policy", str(policy),
                 "--token", alice_token, "-q"])
    assert code == 0
    return seeded_merged_repo


def test_space_repo_has_the_app_requirements_policy_and_a_readme_with_its_secrets(published, hub_url):
    files = set(HfApi(endpoint=hub_url).list_repo_files(SPACE, repo_type="space"))
    assert {"app.py", "requirements.txt", "README.md", "watch_policy.yaml"} <= files
    readme = Path(hf_hub_download(SPACE, "README.md", repo_type="space")).read_text()
    assert readme.startswith("---\ntitle: watch tiny-clip-merged\nsdk: gradio\n")
    assert "app_file: app.py" in readme and f"- {published}" in readme
    assert "`HF_TOKEN`" in readme and "`WEBHOOK_SECRET`" in readme and "/webhooks/watch" in readme
    text = Path(hf_hub_download(SPACE, "requirements.txt", repo_type="space")).read_text()
    requirements = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("#", "-"))]
    assert "hf-merge" not in requirements  # not on PyPI: the Space carries its own copy
    assert any(r.startswith("transformers") for r in requirements) and any(r.startswith("torch") for r in requirements)
    assert {"hf_merge/__init__.py", "hf_merge/watch/webhook.py", "hf_merge/_resources/templates/model_card.md"} <= files
    assert not any(f.startswith(("hf_merge/testing/", "hf_merge/zoo/", "hf_merge/hub_server/")) for f in files)


def test_space_app_runs_its_own_copy_of_hf_merge(published, tmp_path):
    import os
    import subprocess

    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(SPACE, repo_type="space", local_dir=tmp_path / "space"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"WEBHOOK_SECRET": "s", "HF_HUB_OFFLINE": "1"})
    # -I: no user site, no PYTHONPATH, no current folder: only the Space folder (added below) and the
    # installed dependencies; the installed hf-merge is hidden the way a Space without it would be.
    code = (
        "import sys, importlib.abc; sys.path.insert(0, '.');"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()];"
        "import app, hf_merge; print('FILE=' + hf_merge.__file__); server, watcher = app.build(work_dir='work');"
        "print('HOOKS=' + repr(list(server.registered_webhooks)))"
    )
    done = subprocess.run([sys.executable, "-I", "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split("=", 1) for line in done.stdout.splitlines() if line.startswith(("FILE=", "HOOKS=")))
    assert Path(lines["FILE"]).resolve().is_relative_to(folder.resolve())
    assert lines["HOOKS"] == "['/webhooks/watch']"


def test_space_app_builds_the_webhook_server_without_the_network(published, tmp_path, monkeypatch):
    folder = Path(hf_hub_download(SPACE, "app.py", repo_type="space")).parent
    hf_hub_download(SPACE, "watch_policy.yaml", repo_type="space")
    monkeypatch.setenv("WEBHOOK_SECRET", "space-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_not_used_here")

    def no_network(*args, **kwargs):
        raise AssertionError("the Space app contacted the network while starting")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    spec = importlib.util.spec_from_file_location("watcher_space_app", folder / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server, watcher = module.build(work_dir=tmp_path / "work")
    assert list(server.registered_webhooks) == ["/webhooks/watch"]
    assert server.webhook_secret == "space-secret"
    assert watcher.merged_repo == published == module.MERGED_REPO
    assert watcher.policy.licenses == ["mit"] and watcher.policy.max_forgetting == 2
    monkeypatch.delenv("WEBHOOK_SECRET")
    with pytest.raises(UsageError, match="webhook mode needs a secret"):
        module.build(work_dir=tmp_path / "work")
    sys.modules.pop("watcher_space_app", None)


@pytest.mark.parametrize("args, message", [
    (["watch", "publish-space", "alice/x"], "usage: hf-merge watch publish-space MERGED_REPO --space USER/NAME"),
    (["watch", "alice/x", "alice/y"], "unexpected argument 'alice/y'; did you mean `hf-merge watch publish-space`?"),
    (["watch", "alice/x", "--interval", "0"], "--interval must be a positive number of seconds"),
    (["watch", "alice/x", "--policy", "missing.yaml"], "policy file 'missing.yaml' does not exist"),
])
def test_usage_errors_are_one_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"hf-merge: error: {message}"
