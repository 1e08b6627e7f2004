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
    assert "hf-merge" in Path(hf_hub_download(SPACE, "requirements.txt", repo_type="space")).read_text().split()


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
