"""The JSON the local Hub answers reads with: repo info, tree entries, card data and tags.

Kept apart from the storage (what is on disk) and the HTTP layer (who may see it), so each of the
three stays small. Shapes follow what ``huggingface_hub`` parses (``ModelInfo``, ``RepoFile``, ...).
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import yaml

from hf_merge.hub_server.storage import Commit, HubStorage, RepoRecord, TreeEntry

_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def url_prefix(repo_type: str) -> str:
    """``""``, ``"datasets/"`` or ``"spaces/"``: how web URLs of a repo type start."""
    return _URL_PREFIXES[repo_type]


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata block at the top of a README (``---`` ... ``---``); ``{}`` if none.

    Raises:
        ValueError: the block exists but is not a YAML mapping.
    """
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    for index, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            try:
                data = yaml.safe_load("\n".join(lines[1:index]))
            except yaml.YAMLError as error:
                raise ValueError(f"Invalid YAML in metadata: {error}") from error
            if data is None:
                return {}
            if not isinstance(data, dict):
                raise ValueError("Metadata must be a YAML mapping.")
            return data
    raise ValueError("Metadata block is not closed by '---'.")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(item) for item in value] if isinstance(value, (list, tuple)) else [str(value)]


def tags_for(card: dict[str, Any], tree: dict[str, TreeEntry], config: dict[str, Any] | None,
             adapter: dict[str, Any] | None = None) -> list[str]:
    """Tags as the Hub derives them: card tags, library, pipeline, license, datasets, base models.

    A PEFT adapter repo whose card names no ``base_model`` gets it from ``adapter_config.json``
    (``base_model_name_or_path``, when it is a repo id), with the ``adapter`` relation."""
    tags: list[str] = []
    tags += _as_list(card.get("library_name"))
    if any(path.endswith(".safetensors") for path in tree):
        tags.append("safetensors")
    if config and isinstance(config.get("model_type"), str):
        tags.append(config["model_type"])
    tags += _as_list(card.get("tags"))
    tags += _as_list(card.get("pipeline_tag"))
    tags += [f"dataset:{name}" for name in _as_list(card.get("datasets"))]
    bases = _as_list(card.get("base_model"))
    if not bases and adapter and _looks_like_repo_id(adapter.get("base_model_name_or_path")):
        bases = [str(adapter["base_model_name_or_path"])]
    relation = card.get("base_model_relation") or _inferred_relation(bases, tree, config)
    for base in bases:
        tags.append(f"base_model:{base}")
        if isinstance(relation, str):
            tags.append(f"base_model:{relation}:{base}")
    tags += [f"license:{name}" for name in _as_list(card.get("license"))]
    tags += [str(lang) for lang in _as_list(card.get("language"))]
    return list(dict.fromkeys(tags))


def _looks_like_repo_id(value: Any) -> bool:
    # Adapters saved from a local folder name a path ("/mnt/.../checkpoint-24000"): no base repo.
    return isinstance(value, str) and value.count("/") <= 1 and not value.startswith((".", "/", "~")) and bool(value.strip())


def _inferred_relation(bases: list[str], tree: dict[str, TreeEntry], config: dict[str, Any] | None) -> str | None:
    """The Hub's guess when a card names base models without ``base_model_relation``."""
    if not bases:
        return None
    if "adapter_config.json" in tree:
        return "adapter"
    if any(path.endswith(".gguf") for path in tree) or (config and "quantization_config" in config):
        return "quantized"
    return "merge" if len(bases) > 1 else "finetune"


class RepoViews:
    """Builds read responses; card data and tags are cached per commit (commits never change)."""

    def __init__(self, storage: HubStorage):
        self.storage = storage
        self._cache: dict[str, tuple[dict[str, Any], list[str]]] = {}
        self._cache_lock = threading.Lock()

    def card_and_tags(self, commit: Commit) -> tuple[dict[str, Any], list[str]]:
        with self._cache_lock:
            if commit.id in self._cache:
                return self._cache[commit.id]
        card: dict[str, Any] = {}
        readme = commit.tree.get("README.md")
        if readme is not None and not readme.lfs_sha256:
            try:
                card = parse_front_matter(self.storage.read_content(readme).decode("utf-8", "replace"))
            except ValueError:
                card = {}
        config, adapter = self._small_json(commit, "config.json"), self._small_json(commit, "adapter_config.json")
        result = (card, tags_for(card, commit.tree, config, adapter))
        with self._cache_lock:
            self._cache[commit.id] = result
        return result

    def _small_json(self, commit: Commit, path: str) -> dict[str, Any] | None:
        entry = commit.tree.get(path)
        if entry is None or entry.lfs_sha256 or entry.size > (1 << 20):
            return None
        try:
            data = json.loads(self.storage.read_content(entry))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def repo_info(self, record: RepoRecord, commit: Commit, *, full: bool = True) -> dict[str, Any]:
        """``GET /api/{type}s/{id}[/revision/{rev}]`` and one item of ``GET /api/models``."""
        card, tags = self.card_and_tags(commit)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{record.repo_type}/{record.repo_id}".encode()).hexdigest()[:24],
            "id": record.repo_id,
            "author": record.namespace,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": record.created_at,
            "private": record.private,
            "gated": record.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
        }
        if record.repo_type == "model":
            info["modelId"] = record.repo_id
            if card.get("library_name"):
                info["library_name"] = card["library_name"]
            if card.get("pipeline_tag"):
                info["pipeline_tag"] = card["pipeline_tag"]
        if record.repo_type == "space":
            info["sdk"] = card.get("sdk") or record.sdk
        if card:
            info["cardData"] = card
        if full:
            info["siblings"] = [self.sibling(path, entry) for path, entry in sorted(commit.tree.items())]
        return info

    @staticmethod
    def sibling(path: str, entry: TreeEntry) -> dict[str, Any]:
        sibling: dict[str, Any] = {"rfilename": path, "size": entry.size, "blobId": entry.oid}
        if entry.lfs_sha256:
            sibling["lfs"] = {"sha256": entry.lfs_sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        return sibling

    @staticmethod
    def file_entry(path: str, entry: TreeEntry) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
        if entry.lfs_sha256:
            item["lfs"] = {"oid": entry.lfs_sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        return item

    @staticmethod
    def folder_entry(path: str, tree: dict[str, TreeEntry]) -> dict[str, Any]:
        # A stand-in for git's tree id: changes exactly when something below the folder changes.
        below = sorted((name, entry.oid) for name, entry in tree.items() if name.startswith(path + "/"))
        return {"type": "directory", "oid": hashlib.sha1(json.dumps(below).encode()).hexdigest(), "path": path}

    def tree_listing(self, tree: dict[str, TreeEntry], path: str, recursive: bool) -> list[dict[str, Any]] | None:
        """Entries below ``path`` (``""`` for the root); ``None`` if ``path`` is not a folder."""
        prefix = f"{path}/" if path else ""
        if path and not any(name.startswith(prefix) for name in tree):
            return None
        files: list[dict[str, Any]] = []
        folders: dict[str, None] = {}
        for name in sorted(tree):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                folders[prefix + "/".join(parts[:depth])] = None
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                files.append(self.file_entry(name, tree[name]))
        entries = [self.folder_entry(folder, tree) for folder in folders] + files
        return sorted(entries, key=lambda item: item["path"])

    def paths_info(self, tree: dict[str, TreeEntry], paths: list[str]) -> list[dict[str, Any]]:
        """Entries for the given paths (files or folders); unknown paths are left out, as on the Hub."""
        result = []
        for raw in paths:
            path = raw.strip("/")
            if path in tree:
                result.append(self.file_entry(path, tree[path]))
            elif path and any(name.startswith(path + "/") for name in tree):
                result.append(self.folder_entry(path, tree))
        return result
