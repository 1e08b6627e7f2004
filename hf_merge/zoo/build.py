"""Deterministic, cached builder of the offline zoo, and publishing it to a Hub.

``build_zoo()`` pretrains a small CLIP base on the offline caption corpus and fine-tunes one expert per
task, saving each in the Hub layout under ``<cache>/<config hash>/``. A finished build is marked by its
``zoo.json`` manifest and reused as is; an interrupted one is rebuilt from scratch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hf_merge.errors import HfMergeError, PushError
from hf_merge.log import get_logger
from hf_merge.zoo.cache import cache_root
from hf_merge.zoo.cards import base_card, expert_card
from hf_merge.zoo.data import TASKS, load_task
from hf_merge.zoo.finetune import FinetuneConfig, finetune
from hf_merge.zoo.modeling import ModelShape, accuracy, class_heads, save_clip
from hf_merge.zoo.pretrain import PretrainConfig, pretrain

logger = get_logger(__name__)

ZOO_VERSION = 1  # bump when the builder's output changes for the same config
MANIFEST = "zoo.json"


@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines the zoo; its hash names the cache folder.

    The defaults are the regime chosen by ``benchmarks/zoo_search.py`` (see
    ``benchmarks/results/zoo_search.md``).
    """

    shape: ModelShape = field(default_factory=lambda: ModelShape(vision_layers=4, text_layers=1, context_length=16))
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(epochs=6))
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(steps=200, batch_size=64, lr=1e-4))
    tasks: tuple[str, ...] = ("mnist", "fashion_mnist", "animals", "digits8x8", "textures", "faces")
    corpus_scale: float = 1.0
    general_emoji: bool = True
    seed: int = 0

    @classmethod
    def tiny(cls) -> ZooConfig:
        """A miniature zoo for tests: same pipeline, seconds to build."""
        return cls(
            shape=ModelShape(vision_width=32, vision_layers=1, text_width=32, text_layers=1, heads=2,
                             projection_dim=16, context_length=16),
            pretrain=PretrainConfig(epochs=1, batch_size=64, warmup_steps=2),
            finetune=FinetuneConfig(steps=3, batch_size=16),
            tasks=("digits8x8", "faces"),
            corpus_scale=0.03,
            general_emoji=False,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that determines the zoo (names its cache folder)."""
        payload = json.dumps({"version": ZOO_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def base_fingerprint(self) -> str:
        """Hash of what determines the base alone, so zoos differing only in fine-tuning share it."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("shape", "pretrain", "corpus_scale", "general_emoji", "seed")}
        keep["prompts"] = sorted(self.tasks)
        payload = json.dumps({"version": ZOO_VERSION, **keep}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ZooPaths:
    """Folders of a built zoo and the accuracies measured while building it."""

    root: Path
    base: Path
    experts: dict[str, Path]
    metrics: dict[str, dict[str, float]]

    @property
    def expert_list(self) -> list[Path]:
        return list(self.experts.values())


def _default_cache() -> Path:
    return cache_root()


def _load(root: Path) -> ZooPaths:
    manifest = json.loads((root / MANIFEST).read_text())
    return ZooPaths(root=root, base=root / "base", experts={t: root / "experts" / t for t in manifest["tasks"]},
                    metrics=manifest["metrics"])


def build_zoo(cache_dir: str | Path | None = None, config: ZooConfig | None = None, *, force: bool = False) -> ZooPaths:
    """Build (or reuse) the zoo for ``config`` under ``cache_dir/<config hash>/``."""
    config = config or ZooConfig()
    unknown = [t for t in config.tasks if t not in TASKS]
    if unknown:
        raise HfMergeError(f"Unknown zoo task(s) {unknown}; available: {', '.join(TASKS)}.")
    root = Path(cache_dir) if cache_dir is not None else _default_cache()
    target = root / config.fingerprint()
    if (target / MANIFEST).is_file() and not force:
        logger.info("Reusing the zoo in %s", target)
        return _load(target)
    from hf_merge.zoo.tokenizer import load_clip_tokenizer

    work = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    start = time.time()
    tokenizer = load_clip_tokenizer(config.shape.context_length)
    prompts = [t.format(c) for n in config.tasks for c in TASKS[n].classnames for t in TASKS[n].templates]
    base = _pretrained_base(root, config, tokenizer, prompts)
    metrics: dict[str, dict[str, float]] = {}
    experts = {}
    for i, name in enumerate(config.tasks):
        info = TASKS[name]
        heads = class_heads(base, tokenizer, info.classnames, info.templates, config.shape.context_length)
        x_train, y_train = load_task(name, "train")
        logger.info("Fine-tuning the %s expert", name)
        expert = finetune(base, heads, x_train, y_train, config.finetune, seed=config.seed + 1 + i)
        row = {}
        for split in ("val", "test"):
            x, y = load_task(name, split)
            row[f"zero_shot_{split}"] = accuracy(base, heads, x, y)
            row[f"expert_{split}"] = accuracy(expert, heads, x, y)
        metrics[name] = row
        experts[name] = expert
    save_clip(base, work / "base", config.shape, card=base_card(config, metrics))
    for name, expert in experts.items():
        save_clip(expert, work / "experts" / name, config.shape, card=expert_card(config, name, metrics[name]))
    manifest = {"fingerprint": config.fingerprint(), "config": config.to_dict(), "tasks": list(config.tasks),
                "metrics": metrics, "build_seconds": round(time.time() - start, 1)}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    work.rename(target)
    logger.info("Built the zoo in %s (%.0fs)", target, time.time() - start)
    return _load(target)


def _pretrained_base(root: Path, config: ZooConfig, tokenizer, prompts: list[str]):
    """The pretrained base, from ``root/bases/<base hash>`` when an earlier build made it."""
    from transformers import CLIPModel

    from hf_merge.zoo.corpus import build_corpus

    folder = root / "bases" / config.base_fingerprint()
    if (folder / "model.safetensors").is_file():
        logger.info("Reusing the pretrained base in %s", folder)
        return CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    logger.info("Pretraining the zoo's base model (%s)", config.base_fingerprint())
    corpus = build_corpus(seed=config.seed, scale=config.corpus_scale, general=config.general_emoji)
    base = pretrain(corpus, tokenizer, config.shape, config.pretrain, seed=config.seed, extra_texts=prompts)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    base.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return base.eval()


def repo_names(paths: ZooPaths, namespace: str) -> dict[str, str]:
    """Readable repo ids: ``<ns>/zoo-clip-base`` and ``<ns>/zoo-clip-<task>`` per expert."""
    names = {"base": f"{namespace}/zoo-clip-base"}
    for task in paths.experts:
        names[task] = f"{namespace}/zoo-clip-{task.replace('_', '-')}"
    return names


def push_zoo(endpoint: str, token: str, namespace: str, paths: ZooPaths | None = None,
             config: ZooConfig | None = None) -> dict[str, str]:
    """Push the base and every expert to the Hub at ``endpoint``; returns ``{"base"|task: repo_id}``.

    Each expert's card names the pushed base as its ``base_model``. Re-pushing identical files makes
    no new commit on a Hub that deduplicates, so this is safe to call on every demo run.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from hf_merge.hub.client import prepare_client

    prepare_client(endpoint)
    paths = paths or build_zoo(config=config)
    api = HfApi(endpoint=endpoint, token=token)
    names = repo_names(paths, namespace)
    config_dict = json.loads((paths.root / MANIFEST).read_text())["config"]
    for key, repo_id in names.items():
        folder = paths.base if key == "base" else paths.experts[key]
        try:
            api.create_repo(repo_id, repo_type="model", exist_ok=True)
            ops = [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f))
                   for f in sorted(folder.iterdir()) if f.is_file() and f.name != "README.md"]
            card = (folder / "README.md").read_text(encoding="utf-8")
            if key != "base":
                card = card.replace("base_model: zoo-clip-base", f"base_model: {names['base']}")
            ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
            api.create_commit(repo_id, operations=ops, commit_message=f"Upload offline zoo model ({config_dict and key})")
        except Exception as error:  # noqa: BLE001 - any client error becomes a one-line PushError
            raise PushError(f"Could not push {repo_id}: {str(error).splitlines()[0] if str(error) else error!r}",
                            retry_command=None) from error
        logger.info("Pushed %s", repo_id)
    return names


__all__ = ["ZooConfig", "ZooPaths", "build_zoo", "push_zoo", "repo_names"]
