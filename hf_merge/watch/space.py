"""The watcher as a Space: a merged model keeps itself current with no machine of the user's running.

The Space runs the webhook mode (:mod:`hf_merge.watch.webhook`) for one merged repo. Its secrets,
set in the Space settings, are ``HF_TOKEN`` (write access to the merged repo) and
``WEBHOOK_SECRET`` (the secret of the Hub webhook that calls it). The admission policy travels as
``watch_policy.yaml``; without one, the ``watch:`` section of the merged repo's recipe applies.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from hf_merge.declared import excerpt
from hf_merge.errors import SpaceError, UsageError
from hf_merge.hub.repo_ids import is_repo_id
from hf_merge.log import get_logger
from hf_merge.watch.policy import AdmissionPolicy

logger = get_logger(__name__)

APP_TEMPLATE = '''"""hf-merge watcher: keeps {merged_repo} up to date with new fine-tunes of its base.

Secrets: HF_TOKEN (write access to the merged repo), WEBHOOK_SECRET (the Hub webhook's secret).
The Hub webhook calls POST https://<this Space's host>/webhooks/watch on every commit it watches.
"""

import os
import threading
from pathlib import Path

from hf_merge.watch.policy import load_policy_file
from hf_merge.watch.runner import Watcher
from hf_merge.watch.webhook import create_webhook_server

MERGED_REPO = os.environ.get("MERGED_REPO", "{merged_repo}")
HERE = Path(os.path.abspath(__file__)).parent


def policy():
    path = HERE / "watch_policy.yaml"
    if not path.is_file():
        return None
    return load_policy_file(str(path))


def build(work_dir=None):
    """The webhook server and the watcher behind it (nothing is contacted until a delivery)."""
    watcher = Watcher(MERGED_REPO, work_dir=work_dir or os.environ.get("WATCH_WORK_DIR", "/tmp/hf-merge-watch"),
                      token=os.environ.get("HF_TOKEN"), policy=policy())
    server, deliveries = create_webhook_server(watcher, secret=os.environ.get("WEBHOOK_SECRET"))
    return server, watcher


if __name__ == "__main__":
    server, watcher = build()
    # Catch up once at start (fine-tunes pushed while the Space slept), then follow the webhook.
    threading.Thread(target=watcher.run_once, daemon=True).start()
    server.launch(share=False, server_name="0.0.0.0", server_port=7860)
'''

# The Space carries its own copy of hf-merge (``hf_merge/`` beside ``app.py``), so it needs no
# published package; these are that copy's dependencies, installed by the Hub on top of the Gradio SDK.
REQUIREMENTS_HEADER = """# Installed by the Hub on top of the Gradio SDK; hf_merge/ beside app.py is hf-merge itself.
--extra-index-url https://download.pytorch.org/whl/cpu
"""
# What a watcher never runs: the local Hub server, the offline zoo, pytest support.
_NOT_SHIPPED = ("testing", "zoo", "hub_server", "__pycache__", "*.pyc", "examples")


def _requirements() -> str:
    """hf-merge's own dependencies (its installed metadata), without gradio: the SDK brings it."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        declared = requires("hf-merge") or []
    except PackageNotFoundError:  # a source checkout that was never installed
        declared = []
    names = [r.split(";")[0].strip() for r in declared if "extra ==" not in r]
    names = [r for r in names if not r.lower().startswith("gradio")]
    return REQUIREMENTS_HEADER + "".join(f"{r}\n" for r in names or ["torch", "transformers", "huggingface_hub", "accelerate",
                                                                         "evaluate", "datasets", "safetensors", "PyYAML", "Jinja2"])


def _copy_package(out: Path) -> None:
    import shutil

    package = Path(__file__).resolve().parents[1]
    # Links (hf_merge/_resources -> templates, spaces) are copied as the files they point to.
    shutil.copytree(package, out / "hf_merge", ignore=shutil.ignore_patterns(*_NOT_SHIPPED), dirs_exist_ok=True)

README_TEMPLATE = """---
title: {title}
sdk: gradio
sdk_version: {sdk_version}
app_file: app.py
pinned: false
models:
- {merged_repo}
tags:
- hf-merge
- webhooks
short_description: Merges new fine-tunes into {short_repo}
---

# Watcher of {merged_repo}

This Space keeps [{merged_repo}]({endpoint}/{merged_repo}) up to date: the Hub calls it on every
commit of the repos it watches, and each new fine-tune of the model's base that passes the
admission policy is merged as a new commit (hf-merge `watch --webhook`).

Set up:

1. Space secrets (Settings -> Variables and secrets): `HF_TOKEN`, a token with write access to
   `{merged_repo}`; `WEBHOOK_SECRET`, any long random string.
2. A Hub webhook (Settings -> Webhooks) with URL `https://<this Space's host>/webhooks/watch`, the
   same secret, the users or repos to watch, and the "Repo update" domain.

The policy is `watch_policy.yaml` (if present), else the `watch:` section of the model's `recipe.yaml`.
Refused candidates are listed in the model card under "Considered and not merged".
"""


def write_watcher_space(merged_repo: str, out_dir: str | Path, *, space_id: str, policy: AdmissionPolicy | None = None) -> Path:
    """The files of the watcher Space: ``app.py``, ``hf_merge/``, ``requirements.txt``, ``README.md``, the policy."""
    import gradio

    from hf_merge.hub.client import endpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "app.py").write_text(APP_TEMPLATE.format(merged_repo=merged_repo), encoding="utf-8")
    (out / "requirements.txt").write_text(_requirements(), encoding="utf-8")
    _copy_package(out)
    (out / "README.md").write_text(README_TEMPLATE.format(
        title=f"watch {merged_repo.split('/')[-1]}"[:60], sdk_version=gradio.__version__, merged_repo=merged_repo,
        short_repo=merged_repo.split("/")[-1][:30], endpoint=endpoint()), encoding="utf-8")
    if policy is not None:
        (out / "watch_policy.yaml").write_text(yaml.safe_dump({"watch": policy.to_dict()}, sort_keys=False), encoding="utf-8")
    return out


def publish_watcher_space(merged_repo: str, space_id: str, *, token: str | None = None, private: bool = False,
                          policy: AdmissionPolicy | None = None) -> str:
    """Create (or update) the watcher Space of ``merged_repo``; its URL. Secrets are set by the user."""
    from hf_merge.hub import client as hub
    from hf_merge.hub.repo_ids import check_names

    check_names(repo_ids={"merged repo": merged_repo, "--space": space_id})
    if not is_repo_id(space_id) or not is_repo_id(merged_repo):
        raise UsageError(f"expected repo ids USER/NAME, got {excerpt(merged_repo)} and --space {excerpt(space_id)}")
    token = hub.resolve_token(token)
    api = hub.api_client(token)
    with hub.hub_errors(merged_repo, token=token):
        api.model_info(merged_repo)  # the watched model must exist (and be readable)
    with tempfile.TemporaryDirectory(prefix="hf-merge-watch-space-") as tmp:
        folder = write_watcher_space(merged_repo, tmp, space_id=space_id, policy=policy)
        try:
            api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            api.upload_folder(repo_id=space_id, repo_type="space", folder_path=folder,
                              commit_message=f"hf-merge watcher of {merged_repo}")
        except Exception as error:
            raise SpaceError(f"could not publish the watcher Space {space_id} at {hub.endpoint()}: "
                             f"{hub.one_line(error)}") from None
    url = f"{hub.endpoint()}/spaces/{space_id}"
    logger.info("Published the watcher Space %s; set its secrets HF_TOKEN and WEBHOOK_SECRET", url)
    return url
