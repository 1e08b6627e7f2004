"""The Gradio Space of a merged model: build its configuration, publish it, or run it locally.

The app itself is ``spaces/app.py``; it must run on the Hub with nothing but its
``requirements.txt``, so it never imports hf-merge. Everything it shows besides the models (base
and experts with their pinned commits, the evaluated tasks' class lists, the accuracy after each
step) is computed here, once, and written beside it as ``space_config.json``.

A published Space is linked both ways: its README front matter lists the merged model and its
parents under ``models`` (the Hub then shows the Space on their pages), and the merged model's
card gets a "Try it in the Space" link in a separate small commit.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from hf_merge.declared import excerpt
from hf_merge.errors import MergeStateError, SpaceError, UsageError
from hf_merge.hub.repo_ids import is_repo_id
from hf_merge.io.merge_folder import PLOT_FILENAME, RESULTS_FILENAME, STATE_FILENAME, MergeFolder, lineage
from hf_merge.log import get_logger
from hf_merge.publish.accuracy_table import load_accuracy
from hf_merge.publish.card import describe_method
from hf_merge.publish.escape import code_span, markdown_text, one_line, url_part
from hf_merge.publish.space_examples import write_task_examples
from hf_merge.resources import space_app_dir, templates_dir

logger = get_logger(__name__)

CONFIG_NAME = "space_config.json"
CONFIG_VERSION = 1
APP_FILES = ("app.py", "requirements.txt")
MERGE_FILES = (STATE_FILENAME, RESULTS_FILENAME, PLOT_FILENAME)
# Class lists longer than this are left out of the dropdown (one request embeds them all).
MAX_TASK_CLASSES = 1000
DEFAULT_LABELS = "a red square, a blue circle, a green triangle, a yellow star, a cat, a dog"
SHORT_DESCRIPTION_MAX = 60  # the Hub rejects longer short_description values
LINK_MARKER = "Try it in the Space"


# ------------------------------------------------------------------------------------ config
def build_space_config(
    merged: str | Path,
    *,
    token: str | None = None,
    revision: str | None = None,
    keep_local_paths: bool = False,
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """What ``app.py`` needs to serve ``merged`` (a repo id or a local merge folder).

    Args:
        merged: Repo id of a merged model on the Hub, or a local output folder.
        token: Token for a private repo.
        revision: Revision of the merged repo to read the merge files from (default: latest).
        keep_local_paths: Keep the local folders of parents merged from disk, so that a local run
            can compare with them; never set when publishing (the paths mean nothing elsewhere).
        work_dir: Where downloaded merge files go (default: a new temporary folder).

    A model without ``merge_state.json`` is served too, without comparisons; one without
    ``eval_results.json`` has no task lists and no accuracy tab content.
    """
    folder, repo_id, commit_sha = _merge_files(merged, token=token, revision=revision, work_dir=work_dir)
    try:
        state = MergeFolder(folder).state()
    except MergeStateError:
        logger.warning("%s has no readable %s: the Space will offer no comparisons", merged, STATE_FILENAME)
        state = None
    base, experts = lineage(state) if state is not None else ({}, [])
    accuracy = load_accuracy(folder)
    method = str(state.method or "") if state is not None else ""
    model_ref = repo_id or str(Path(merged).resolve())
    config: dict[str, Any] = {
        "format_version": CONFIG_VERSION,
        "model": model_ref,
        # The Space follows the repo's latest commit: `hf-merge add` updates the model in place.
        "revision": revision,
        "title": f"{model_ref.rstrip('/').split('/')[-1]}: zero-shot classification",
        "method": method,
        "base": _provenance(base, keep_local_paths),
        "experts": [_provenance(e, keep_local_paths) for e in experts],
        "tasks": _task_classes(accuracy.tasks if accuracy else []),
        "accuracy": _accuracy(accuracy),
        "plot": PLOT_FILENAME if (folder / PLOT_FILENAME).is_file() else None,
        "default_labels": DEFAULT_LABELS,
        "merged_commit": commit_sha,
    }
    config["_source_dir"] = str(folder)  # where the plot is; removed before writing
    return config


def _merge_files(merged: str | Path, *, token, revision, work_dir) -> tuple[Path, str | None, str | None]:
    """``(folder holding the merge files, repo id, commit sha)``; downloads only the small files."""
    path = Path(merged).expanduser()
    if path.is_dir():
        return path, None, None
    repo_id = str(merged)
    if not is_repo_id(repo_id):
        raise UsageError(f"{excerpt(merged)} is neither a local folder nor a repo id like USER/NAME")
    import huggingface_hub

    from hf_merge.hub.client import api_client, endpoint, hub_errors, resolve_token

    token = resolve_token(token)
    with hub_errors(repo_id, token=token):
        info = api_client(token).model_info(repo_id, revision=revision)
        target = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="hf-merge-space-"))
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=info.sha or revision,
            token=token if token else False,
            allow_patterns=list(MERGE_FILES),
            local_dir=target,
            endpoint=endpoint(),
            library_name="hf-merge",
        )
    return Path(folder), repo_id, info.sha


def _provenance(source: dict[str, Any], keep_local_paths: bool) -> dict[str, Any]:
    entry = {key: source.get(key) for key in ("name", "repo_id", "commit_sha", "step") if source.get(key) is not None}
    local = source.get("local_path") or source.get("path")
    if keep_local_paths and local and not entry.get("repo_id"):
        entry["path"] = str(local)
    return entry


def _task_classes(task_names: list[str]) -> dict[str, list[str]]:
    """Class names of the evaluated tasks that the registry knows (others get no dropdown entry)."""
    classes: dict[str, list[str]] = {}
    if not task_names:
        return classes
    try:
        from hf_merge.evaluation import get_task
    except ImportError:  # evaluation extras missing: the Space still works with free-text labels
        return classes
    for name in task_names:
        try:
            names = list(get_task(name).classes)
        except Exception as error:  # a task registered only in the merging session
            logger.info("No class list for task %s in the Space (%s)", name, error)
            continue
        if len(names) <= MAX_TASK_CLASSES:
            classes[name] = names
    return classes


def _accuracy(table) -> dict[str, Any] | None:
    if table is None:
        return None
    rows = [
        {"step": step, "accuracy": [row.get(task) for task in table.tasks], "average": average}
        for step, row, average in zip(table.steps, table.accuracy, table.averages(), strict=False)
    ]
    return {"tasks": list(table.tasks), "rows": rows, "bwt": table.bwt(), "limit": table.limit}


def write_space_folder(config: dict[str, Any], out_dir: str | Path, *, readme: str | None = None) -> Path:
    """The files of the Space: app, requirements, examples, ``space_config.json``, plot, README."""
    out_dir = Path(out_dir)
    app_dir = space_app_dir()
    if not (app_dir / "app.py").is_file():
        raise SpaceError(f"the Space app is missing from the installation ({app_dir / 'app.py'})")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in APP_FILES:
        shutil.copy2(app_dir / name, out_dir / name)
    config = dict(config)
    # The merged tasks' own test images; the generic shapes only when no task has any.
    examples = write_task_examples(list((config.get("accuracy") or {}).get("tasks") or []), out_dir)
    config["examples"] = [example.to_dict() for example in examples]
    if not examples and (app_dir / "examples").is_dir():
        (out_dir / "examples").mkdir(exist_ok=True)
        for example in sorted((app_dir / "examples").glob("*.png")):
            shutil.copy2(example, out_dir / "examples" / example.name)
    source_dir = config.pop("_source_dir", None)
    config.pop("_dir", None)
    if config.get("plot") and source_dir and (Path(source_dir) / config["plot"]).is_file():
        shutil.copy2(Path(source_dir) / config["plot"], out_dir / config["plot"])
    else:
        config["plot"] = None
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if readme is not None:
        (out_dir / "README.md").write_text(readme, encoding="utf-8")
    return out_dir


# ------------------------------------------------------------------------------------ README
def render_space_readme(config: dict[str, Any], space_id: str) -> str:
    """README.md of the Space: Hub front matter (sdk, app_file, models, ...) and a short text."""
    import gradio
    from huggingface_hub import SpaceCard, SpaceCardData

    from hf_merge.hub.client import endpoint

    hub = endpoint()
    model_id = config["model"]
    base = dict(config.get("base") or {})
    experts = [dict(e) for e in config.get("experts") or []]
    models = [model_id] + [s["repo_id"] for s in [base, *experts] if s.get("repo_id")]
    for source in [base, *experts]:  # shown in Markdown: names come from the merge state, escaped
        if source.get("repo_id"):
            source["url"] = f"{hub}/{url_part(source['repo_id'])}"
            source.setdefault("name", source["repo_id"])
        else:
            source["url"] = "#"
        if source.get("name"):
            source["name"] = code_span(source["name"])
        source["step"] = markdown_text(source.get("step", ""))
    method = config.get("method") or ""
    method_title = describe_method(method)[0] if method else "a merging method"
    short = f"Zero-shot CLIP merged with {method or 'hf-merge'}"
    card_data = SpaceCardData(
        title=space_id.split("/")[-1][:60],
        sdk="gradio",
        sdk_version=gradio.__version__,
        app_file="app.py",
        models=list(dict.fromkeys(models)),
        tags=["hf-merge", "merge", "clip", "zero-shot-image-classification"] + ([method] if method else []),
        short_description=short[:SHORT_DESCRIPTION_MAX],
        emoji="🧬",
        colorFrom="indigo",
        colorTo="pink",
        pinned=False,
    )
    card = SpaceCard.from_template(
        card_data,
        template_path=str(templates_dir() / "space_readme.md"),
        title=markdown_text(config.get("title") or space_id),
        model_id=code_span(model_id),
        model_url=f"{hub}/{url_part(model_id)}",
        run_id=one_line(model_id).replace("`", ""),
        base=base if base.get("name") else None,
        experts=experts,
        method_title=method_title,
    )
    return str(card)


# ------------------------------------------------------------------------------------ publish
def publish_space(
    merged_repo: str,
    space_id: str | None = None,
    token: str | None = None,
    *,
    private: bool = False,
    link_card: bool = True,
) -> str:
    """Create (or update) the Gradio Space of a merged model on the Hub; return its URL.

    Args:
        merged_repo: Repo id of the merged model (``USER/NAME``); it must be on the Hub already.
        space_id: Space to create, ``USER/NAME``; default: the model's own id (Spaces and models
            have separate namespaces on the Hub, so the same name never collides).
        token: Write token; defaults to ``HF_TOKEN`` or the stored login. Never written anywhere.
        private: Create the Space private (an existing Space keeps its visibility).
        link_card: Add a "Try it in the Space" link to the model card (own small commit).

    Raises:
        UsageError: ``merged_repo`` is a local folder or not a repo id.
        ModelNotFoundError, AuthenticationError: The Hub refused to read the model.
        SpaceError: The Hub refused to create or update the Space.
    """
    from hf_merge.hub.client import api_client, endpoint, resolve_token

    if Path(merged_repo).expanduser().is_dir():
        raise UsageError(f"{merged_repo} is a local folder: push it first (hf-merge push), then publish its repo id")
    from hf_merge.hub.repo_ids import check_names

    check_names(repo_ids={"merged repo": merged_repo, "--space": space_id})
    if not is_repo_id(str(merged_repo)):
        raise UsageError(f"{excerpt(merged_repo)} is not a repo id like USER/NAME")
    space_id = space_id or merged_repo
    if not is_repo_id(space_id):
        raise UsageError(f"--space must look like USER/NAME, got {excerpt(space_id)}")
    token = resolve_token(token)
    api = api_client(token)
    with tempfile.TemporaryDirectory(prefix="hf-merge-space-") as tmp:
        config = build_space_config(merged_repo, token=token, work_dir=Path(tmp) / "merge")
        if not private and _is_private(api, merged_repo):
            logger.warning(
                "%s is private: add an HF_TOKEN secret with read access in the Space settings, "
                "or the public Space cannot load it", merged_repo,
            )
        readme = render_space_readme(config, space_id)
        folder = write_space_folder(config, Path(tmp) / "space", readme=readme)
        try:
            api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            api.upload_folder(
                repo_id=space_id,
                repo_type="space",
                folder_path=folder,
                commit_message=f"Space for {merged_repo}",
            )
        except Exception as error:
            raise SpaceError(f"could not publish the Space {space_id} at {endpoint()}: {_one_line(error)}") from None
    url = f"{endpoint()}/spaces/{space_id}"
    logger.info("Published the Space %s", url)
    if link_card:
        try:
            link_space_in_card(merged_repo, space_id, token=token)
        except Exception as error:  # e.g. a Space for someone else's model: the Space still stands
            logger.warning("The Space is published, but the card of %s could not link it: %s", merged_repo, _one_line(error))
    return url


def _is_private(api, repo_id: str) -> bool:
    try:
        return bool(api.model_info(repo_id).private)
    except Exception:  # only a hint; the Space is published either way
        return False


def link_space_in_card(merged_repo: str, space_id: str, *, token: str | None = None) -> bool:
    """Add a "Try it in the Space" line to the model card; ``False`` if it links the Space already."""
    from huggingface_hub.errors import EntryNotFoundError

    from hf_merge.hub.client import api_client, endpoint

    api = api_client(token)
    url = f"{endpoint()}/spaces/{space_id}"
    try:
        text = Path(api.hf_hub_download(merged_repo, "README.md", token=token or False)).read_text(encoding="utf-8")
    except EntryNotFoundError:
        text = f"# {merged_repo.split('/')[-1]}\n"
    if url in text or f"spaces/{space_id})" in text:
        return False
    updated = insert_space_link(text, space_id, url)
    api.upload_file(
        path_or_fileobj=updated.encode("utf-8"),
        path_in_repo="README.md",
        repo_id=merged_repo,
        commit_message=f"Link the Space {space_id}",
    )
    return True


def insert_space_link(card_text: str, space_id: str, url: str) -> str:
    """The card with a link line inserted under its first title (after the front matter)."""
    line = f"**{LINK_MARKER}:** [{space_id}]({url})"
    lines = card_text.split("\n")
    start = 0
    if lines and lines[0].strip() == "---":  # skip YAML front matter
        end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
        start = end + 1 if end is not None else 0
    title = next((i for i in range(start, len(lines)) if lines[i].startswith("# ")), None)
    at = title + 1 if title is not None else start
    return "\n".join(lines[:at] + ["", line] + lines[at:])


def _one_line(error: object) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


# ------------------------------------------------------------------------------------ run
def load_app_module() -> ModuleType:
    """Import ``spaces/app.py`` (not a package module: it ships as a Space on its own)."""
    path = space_app_dir() / "app.py"
    spec = importlib.util.spec_from_file_location("hf_merge_space_app", path)
    if spec is None or spec.loader is None:
        raise SpaceError(f"cannot load the Space app from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def create_space_app(repo: str | Path, *, token: str | None = None, work_dir: str | Path | None = None):
    """``(gradio.Blocks, app module)`` serving ``repo`` (a merged repo id or local folder)."""
    config = build_space_config(repo, token=token, keep_local_paths=True, work_dir=work_dir)
    config["_dir"] = config.pop("_source_dir")
    if token:
        import os

        # The app reads private models with HF_TOKEN, as on the Hub (a process-local setting).
        os.environ.setdefault("HF_TOKEN", token)
    app = load_app_module()
    return app.build_demo(config), app


def run_space(repo: str | Path, host: str = "127.0.0.1", port: int = 7860, *, token: str | None = None) -> None:
    """Serve the Space of ``repo`` locally until interrupted (``hf-merge space run``)."""
    with tempfile.TemporaryDirectory(prefix="hf-merge-space-") as tmp:
        demo, app = create_space_app(repo, token=token, work_dir=tmp)
        logger.info("Serving %s on http://%s:%d", repo, host, port)
        demo.launch(server_name=host, server_port=port, max_file_size=app.MAX_IMAGE_BYTES)
