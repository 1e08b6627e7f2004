"""pytest plugin: tiny CLIP models on disk and pushed to the local Hub server.

Enable with ``pytest_plugins = ["hf_merge.testing.fixtures_hub", "hf_merge.testing.fixtures_models"]``.
Models are built once per test session (about a second in all); tests that only need repo ids
use `seeded_hub` and never see a local path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hf_merge.testing.tiny_clip import build_tiny_zoo, write_merge_result

N_EXPERTS = 6
NAMESPACE = "alice"
BASE_REPO = f"{NAMESPACE}/tiny-clip-base"
MERGED_REPO = f"{NAMESPACE}/tiny-clip-merged"
MERGED_TASKS = ("synthetic/colors", "mnist", "eurosat")


def expert_repo(index: int) -> str:
    """Repo id of expert ``index`` in `seeded_hub`."""
    return f"{NAMESPACE}/tiny-clip-expert-{index}"


@dataclass(frozen=True)
class SeededHub:
    """What `seeded_hub` pushed: repo ids, the commit each push made, and the local sources."""

    endpoint: str
    base: str
    experts: list[str]
    commits: dict[str, str] = field(default_factory=dict)
    base_dir: Path | None = None
    expert_dirs: list[Path] = field(default_factory=list)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> tuple[Path, list[Path]]:
    """``(base_dir, [expert_dir, ...])``: a tiny CLIP base and six vision experts."""
    return build_tiny_zoo(tmp_path_factory.mktemp("tiny-zoo"), N_EXPERTS, seed=0)


@pytest.fixture(scope="session")
def tiny_base(tiny_zoo) -> Path:
    """Folder of the tiny CLIP base model (Hub layout)."""
    return tiny_zoo[0]


@pytest.fixture(scope="session")
def tiny_experts(tiny_zoo) -> list[Path]:
    """Folders of six tiny experts derived from `tiny_base` (vision tower perturbed)."""
    return tiny_zoo[1]


@pytest.fixture(scope="session")
def seeded_hub(hub_server, hub_api, tiny_base, tiny_experts) -> SeededHub:
    """The local Hub server with ``alice/tiny-clip-base`` and ``alice/tiny-clip-expert-{0..5}``."""
    commits: dict[str, str] = {}
    sources = [(BASE_REPO, tiny_base)] + [(expert_repo(i), path) for i, path in enumerate(tiny_experts)]
    for repo_id, folder in sources:
        hub_api.create_repo(repo_id, exist_ok=True)
        info = hub_api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Add tiny CLIP")
        commits[repo_id] = info.oid
    return SeededHub(
        endpoint=hub_api.endpoint,
        base=BASE_REPO,
        experts=[expert_repo(i) for i in range(len(tiny_experts))],
        commits=commits,
        base_dir=tiny_base,
        expert_dirs=list(tiny_experts),
    )


@pytest.fixture(scope="session")
def seeded_merged_repo(seeded_hub, hub_api, tmp_path_factory) -> str:
    """``alice/tiny-clip-merged``: a merge result of 3 seeded experts, with state, evaluation and card.

    The weights are the experts' average, written in the layout of a merge output folder
    (see `write_merge_result`); it stands in for an engine run where only the folder matters.
    """
    n = len(MERGED_TASKS)
    folder = write_merge_result(
        tmp_path_factory.mktemp("merged") / "out",
        seeded_hub.base_dir,
        seeded_hub.expert_dirs[:n],
        base={"name": seeded_hub.base, "repo_id": seeded_hub.base, "commit_sha": seeded_hub.commits[seeded_hub.base]},
        experts=[
            {"name": repo, "repo_id": repo, "commit_sha": seeded_hub.commits[repo]} for repo in seeded_hub.experts[:n]
        ],
        tasks=list(MERGED_TASKS),
    )
    from hf_merge.publish.card import write_card

    write_card(folder, repo_id=MERGED_REPO, licenses={}, plot=True)  # draws accuracy.png too
    hub_api.create_repo(MERGED_REPO, exist_ok=True)
    hub_api.upload_folder(repo_id=MERGED_REPO, folder_path=folder, commit_message="Add merged tiny CLIP")
    return MERGED_REPO


@pytest.fixture(scope="session")
def space_url(seeded_merged_repo, tmp_path_factory) -> Iterator[str]:
    """The Space app of ``alice/tiny-clip-merged``, served locally; its URL."""
    from hf_merge.publish.space import create_space_app
    from hf_merge.testing.net import free_port

    demo, app = create_space_app(seeded_merged_repo, work_dir=tmp_path_factory.mktemp("space"))
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                max_file_size=app.MAX_IMAGE_BYTES)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
