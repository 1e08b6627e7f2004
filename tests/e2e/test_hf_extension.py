"""`hf extensions install OWNER/hf-merge` installs this repository, and then `hf merge ...` runs hf-merge.

huggingface_hub's installer (``huggingface_hub/cli/extensions.py``) pip-installs
``https://github.com/OWNER/hf-merge/archive/HEAD.zip`` into a virtual environment of its own under
``~/.local/share/hf/extensions/hf-merge/`` and requires the console script ``hf-merge``; ``hf merge``
then runs that script. Only the network steps are replaced here: the GitHub look-ups, and the archive,
which becomes a wheel built from a local clone. The new environment borrows this one's dependencies
(torch, transformers, ...) through a ``.pth`` file instead of downloading them again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ARCHIVE_SUFFIX = "/archive/HEAD.zip"


def _local_clone(destination: Path) -> Path:
    if (REPO_ROOT / ".git").exists():
        subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(destination)], check=True)
    else:  # a source tree without git history: copy what a clone would hold
        shutil.copytree(REPO_ROOT, destination, ignore=shutil.ignore_patterns(".venv", "*.egg-info", "__pycache__"))
    return destination


@pytest.mark.slow
def test_hf_extensions_install_then_hf_merge(tmp_path, monkeypatch):
    import huggingface_hub.cli.extensions as extensions
    from huggingface_hub.cli.hf import app

    clone = _local_clone(tmp_path / "hf-merge")
    assert not (clone / "hf-merge").exists()  # a top-level `hf-merge` file would be installed as a shell script
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(clone)],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("hf_merge-*.whl")

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setattr(extensions, "_github_repo_exists", lambda **_: True)
    monkeypatch.setattr(extensions, "_fetch_remote_binary", lambda **_: (_ for _ in ()).throw(FileNotFoundError("no script")))
    monkeypatch.setattr(extensions, "_fetch_latest_commit_sha", lambda **_: "0" * 40)
    monkeypatch.setattr(extensions, "_try_fetch_remote_description", lambda **_: "hf-merge")
    real_which, real_run = shutil.which, subprocess.run
    monkeypatch.setattr(extensions.shutil, "which", lambda name, *a, **k: None if name == "uv" else real_which(name, *a, **k))
    pip_commands = []

    def run(cmd, **kwargs):
        if any(str(arg).endswith(ARCHIVE_SUFFIX) for arg in cmd):
            pip_commands.append([str(a) for a in cmd])
            venv_python = Path(cmd[0])
            purelib = real_run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
            Path(purelib, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
            cmd = [str(wheel) if str(a).endswith(ARCHIVE_SUFFIX) else a for a in cmd] + ["--no-deps", "--no-index"]
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(extensions.subprocess, "run", run)
    with pytest.raises(SystemExit) as done:
        app(["extensions", "install", "example-org/hf-merge"], prog_name="hf")
    assert done.value.code in (0, None)
    assert pip_commands and pip_commands[0][-1] == "https://github.com/example-org/hf-merge/archive/HEAD.zip"
    manifest = home / ".local/share/hf/extensions/hf-merge/manifest.json"
    assert manifest.is_file()
    installed = home / ".local/share/hf/extensions/hf-merge/venv/bin/hf-merge"
    assert installed.is_file()

    hf = Path(sys.executable).with_name("hf")
    env = {**os.environ, "HOME": str(home), "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    top = subprocess.run([str(hf), "merge", "--help"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    assert "usage: hf-merge" in top.stdout and "Merge fine-tuned CLIP models" in top.stdout
    for command in ("merge", "add", "eval", "space", "hub"):
        assert command in top.stdout
    sub = subprocess.run([str(hf), "merge", "merge", "--help"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert sub.returncode == 0 and "--experts" in sub.stdout
    # `hf merge` ran the extension's own copy of hf-merge, not this checkout's.
    where = subprocess.run(
        [str(installed.parent / "python"), "-c", "import hf_merge; print(hf_merge.__file__)"],
        capture_output=True, text=True, env=env, check=True, cwd=tmp_path,
    ).stdout
    assert str(home) in where
