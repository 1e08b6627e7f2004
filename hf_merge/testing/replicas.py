"""Small replicas of the paper's real Hub repos, published to a local Hub under their real ids.

What is replicated (facts and sources: the project's notes on the real repos):

- ``openai/clip-vit-base-patch32``: a full ``CLIPModel`` whose ``main`` has only
  ``pytorch_model.bin`` (400 tensors, with both int64 ``position_ids``) next to
  ``flax_model.msgpack`` and ``tf_model.h5`` (placeholder bytes here: nothing may download them),
  the real ``config.json`` fields (widths reduced), the real ``preprocessor_config.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json`` and ``.gitattributes`` verbatim, a
  tokenizer of the same files (a small vocabulary), and a card without a license. The
  safetensors weights are in the open pull request ``refs/pr/66`` by ``SFconvertbot``, titled
  "Adding `safetensors` variant of this model", which adds ``model.safetensors`` (same 400
  tensors, ``{"format": "pt"}``) and one ``.gitattributes`` line; an older conversion pull
  request ``refs/pr/15`` branches from an earlier ``main``.
- ``tanganke/clip-vit-base-patch32_<task>`` for the 8 tasks: ``CLIPVisionModel`` checkpoints
  (``config.json`` with the real fields, ``model.safetensors`` with the 199 ``vision_model.*``
  float32 tensors, no ``position_ids``, no ``visual_projection``) and the real cards (``base_model``,
  ``datasets``, ``metrics``, no license). Each is fine-tuned for a few steps on its replica
  dataset, vision tower only, as the real ones were (Adam, constant learning rate).
- The 8 evaluation datasets: :mod:`hf_merge.testing.replica_datasets`.

The widths are reduced (32-wide, 2 layers, projection 512, 224-px input in 32-px patches: the same
50 positions as the real model), so building everything takes seconds; it is cached by content
version under ``cache_dir``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_merge.hub.conversion_pr import CONVERSION_BOT, PR_TITLE
from hf_merge.hub_server.storage import HubStorage, RepoRecord
from hf_merge.testing.replica_datasets import REAL_DATASETS, ReplicaDataset, split_rows, write_dataset
from hf_merge.testing.tiny_clip import create_tiny_clip, tiny_bpe

BASE_ID = "openai/clip-vit-base-patch32"
TASKS = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
EXPERT_IDS = tuple(f"tanganke/clip-vit-base-patch32_{task}" for task in TASKS)
PR_NUM = 66
OLD_PR_NUM = 15
# The real model's widths are 768 (vision) and 512 (text); these keep every name and the
# number of positions and change only the sizes.
WIDTH, LAYERS, HEADS = 32, 2, 2
_VERSION = 3
_FILES = Path(__file__).parent / "replica_files"
_LFS_SUFFIXES = (".bin", ".msgpack", ".h5", ".safetensors", ".parquet")
# Files that never reach a merge: their content is a marker a test looks for in the cache.
PLACEHOLDER = b"hf-merge replica placeholder: this file must never be downloaded\n"

GITATTRIBUTES_BASE = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin.*", "*.lfs.*", "*.bin", "*.h5", "*.tflite", "*.tar.gz", "*.ot", "*.onnx", "*.arrow",
                    "*.ftz", "*.joblib", "*.model", "*.msgpack", "*.pb", "*.pt", "*.pth")
)
_TOKENIZER_CONFIG = (
    '{"unk_token": {"content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, '
    '"normalized": true, "__type": "AddedToken"}, "bos_token": {"content": "<|startoftext|>", "single_word": false, '
    '"lstrip": false, "rstrip": false, "normalized": true, "__type": "AddedToken"}, "eos_token": {"content": '
    '"<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "__type": '
    '"AddedToken"}, "pad_token": "<|endoftext|>", "add_prefix_space": false, "errors": "replace", "do_lower_case": '
    'true, "name_or_path": "./clip_ViT_B_32/", "model_max_length": 77}'
)
_SPECIAL_TOKENS_MAP = (
    '{"bos_token": {"content": "<|startoftext|>", "single_word": false, "lstrip": false, "rstrip": false, '
    '"normalized": true}, "eos_token": {"content": "<|endoftext|>", "single_word": false, "lstrip": false, '
    '"rstrip": false, "normalized": true}, "unk_token": {"content": "<|endoftext|>", "single_word": false, '
    '"lstrip": false, "rstrip": false, "normalized": true}, "pad_token": "<|endoftext|>"}'
)
_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "size": 224,
}
BASE_CARD = """---
tags:
- vision
widget:
- src: https://huggingface.co/datasets/mishig/sample_images/resolve/main/cat-dog-music.png
  candidate_labels: playing music, playing sports
  example_title: Cat & Dog
---

# Model Card: CLIP

A small replica of the CLIP ViT-B/32 repository for tests (same files and tensor names, smaller widths).
"""
_CARD_DATASETS = {"svhn": "svhn", "mnist": "mnist", "stanford-cars": "tanganke/stanford_cars"}
_TRAINING_DATA = {"sun397": "Sun397", "stanford-cars": "Standford Cars dataset", "resisc45": "RESISC45 dataset",
                  "eurosat": "EuroSAT dataset", "svhn": "SVHN", "gtsrb": "GTSRB dataset", "mnist": "MNIST dataset",
                  "dtd": "DTD dataset"}


@dataclass
class Replicas:
    """What :func:`publish_replicas` put on the Hub.

    Attributes:
        base: ``openai/clip-vit-base-patch32``.
        experts: The 8 expert repo ids, in the paper's order.
        datasets: The 8 dataset repo ids.
        main_sha / pr_sha: The base's ``main`` commit and its conversion pull request's head.
        folder: Local folder with every repo's files (``<owner>/<name>/``, ``pr/`` for the PR's).
    """

    base: str
    experts: list[str]
    datasets: list[str]
    main_sha: str
    pr_sha: str
    folder: Path
    expert_shas: dict[str, str] = field(default_factory=dict)


def build_replica_files(cache_dir: str | Path) -> Path:
    """Every replica repo's files under ``cache_dir`` (built once per content version)."""
    root = Path(cache_dir) / f"replicas-v{_VERSION}"
    if root.is_dir():
        return root
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        model, tokenizer = _write_base(staging / BASE_ID)
        for dataset in REAL_DATASETS:
            write_dataset(dataset, staging / "datasets" / dataset.repo_id)
        for task, repo_id in zip(TASKS, EXPERT_IDS, strict=False):
            dataset = next(d for d in REAL_DATASETS if d.task == task)
            write_expert(model, tokenizer, task, dataset, staging / repo_id)
        try:
            staging.rename(root)
        except OSError:  # built by another process meanwhile
            if not root.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def base_config() -> dict:
    config = json.loads((_FILES / "openai-clip-vit-base-patch32.config.json").read_text(encoding="utf-8"))
    vocab, _ = tiny_bpe()
    for tower in ("text_config", "vision_config"):
        config[tower].update(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                             num_attention_heads=HEADS)
    config["text_config"]["vocab_size"] = len(vocab)
    return config


def _write_base(out: Path):
    """The base's ``main`` files and the conversion PR's ``model.safetensors``; returns the model."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    out.mkdir(parents=True, exist_ok=True)
    config = base_config()
    tiny, processor = create_tiny_clip(image_size=224, patch_size=32, hidden_size=WIDTH, num_layers=LAYERS,
                                       num_heads=HEADS, projection_dim=512)
    with torch.random.fork_rng(devices=[]):
        model = CLIPModel(CLIPConfig.from_dict(config))
    missing = model.load_state_dict(tiny.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys
    model.eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    # The real checkpoint keeps both position_ids buffers (int64), which newer models no longer save.
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    state["vision_model.embeddings.position_ids"] = torch.arange(50).unsqueeze(0)
    torch.save(state, out / "pytorch_model.bin")
    (out / "pr").mkdir()
    save_file(state, out / "pr" / "model.safetensors", metadata={"format": "pt"})
    (out / "pr" / ".gitattributes").write_text(GITATTRIBUTES_BASE + "model.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (out / ".gitattributes").write_text(GITATTRIBUTES_BASE)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(_PREPROCESSOR, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(_TOKENIZER_CONFIG)
    (out / "special_tokens_map.json").write_text(_SPECIAL_TOKENS_MAP)
    scratch = out / "_tokenizer"
    processor.tokenizer.save_pretrained(scratch)
    shutil.move(str(scratch / "tokenizer.json"), out / "tokenizer.json")
    shutil.rmtree(scratch)
    vocab, merges = tiny_bpe()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (out / "flax_model.msgpack").write_bytes(PLACEHOLDER)
    (out / "tf_model.h5").write_bytes(PLACEHOLDER)
    (out / "README.md").write_text(BASE_CARD)
    return model, processor


def fine_tune(model, processor, task: str, dataset: ReplicaDataset, params: list, lr: float = 5e-3) -> None:
    """A few Adam steps of ``params`` (constant learning rate) on the replica's train split, with
    the zero-shot head of ``task`` as the classifier, as the real experts were trained."""
    from hf_merge.evaluation.heads import class_embeddings
    from hf_merge.evaluation.tasks import get_task

    head = class_embeddings(model, processor.tokenizer, get_task(task))
    images, labels = split_rows(dataset, "train")
    pixels = processor.image_processor([image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    targets = torch.tensor(labels)
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(12):
            embeds = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            loss = torch.nn.functional.cross_entropy(100.0 * embeds @ head.T, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def write_expert(base_model, processor, task: str, dataset: ReplicaDataset, out: Path, base_id: str = BASE_ID,
                  architecture: str = "ViT-Base with patch size 32") -> None:
    """A ``CLIPVisionModel`` fine-tuned on the replica's train split, vision tower only."""
    import copy

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(base_model)
    fine_tune(model, processor, task, dataset, [p for n, p in model.named_parameters() if n.startswith("vision_model.")])
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k.startswith("vision_model.")}
    tensors.pop("vision_model.embeddings.position_ids", None)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    vision = base_model.config.vision_config
    config = {
        "_name_or_path": "results/clip_mnist/" if task == "mnist" else "results/temp/",
        "architectures": ["CLIPVisionModel"],
        "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": vision.hidden_size,
        "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": vision.intermediate_size, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
        "num_attention_heads": vision.num_attention_heads, "num_channels": 3,
        "num_hidden_layers": vision.num_hidden_layers, "patch_size": vision.patch_size,
        "projection_dim": base_model.config.projection_dim,
        "torch_dtype": "float32", "transformers_version": "4.39.1",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card_dataset = _CARD_DATASETS.get(task, f"tanganke/{task}")
    (out / "README.md").write_text(
        f"---\nbase_model:\n- {base_id}\ndatasets:\n- {card_dataset}\nmetrics:\n- accuracy\n---\n"
        f"# Model Card\n\n## Model Details\n\n- Architecture: {architecture}\n"
        f"- Training Data: {_TRAINING_DATA[task]}\n\n## Training Details\n\n"
        "  Adam Optimizer with a constant learning rate for a few steps (replica).\n"
        "  Only the vision encoder is fine-tuned.\n"
    )


# ------------------------------------------------------------------------------------ publishing
def publish_replicas(storage: HubStorage, cache_dir: str | Path, *, models: bool = True) -> Replicas:
    """Build (or reuse) the replicas and publish them into a local Hub's storage, as their owners
    and the conversion bot would have (``models=False``: the datasets only). Existing replica
    repos are left as they are."""
    root = build_replica_files(cache_dir)
    if models:
        _publish_models(storage, root)
    for dataset in REAL_DATASETS:
        if storage.get_repo("dataset", dataset.repo_id) is None:
            folder = root / "datasets" / dataset.repo_id
            files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            storage.create_repo(RepoRecord("dataset", dataset.repo_id), author=dataset.repo_id.split("/")[0])
            commit(storage, "dataset", dataset.repo_id, folder, files, "Convert dataset to Parquet", "parquet-converter")
    if not models:
        return Replicas(base=BASE_ID, experts=[], datasets=[d.repo_id for d in REAL_DATASETS], main_sha="", pr_sha="", folder=root)
    refs = storage.read_refs("model", BASE_ID)
    return Replicas(
        base=BASE_ID, experts=list(EXPERT_IDS), datasets=[d.repo_id for d in REAL_DATASETS],
        main_sha=refs.branches["main"], pr_sha=refs.pull_requests[str(PR_NUM)], folder=root,
        expert_shas={r: storage.read_refs("model", r).branches["main"] for r in EXPERT_IDS},
    )


def _publish_models(storage: HubStorage, root: Path) -> None:
    base_dir = root / BASE_ID
    main_files = sorted(p.name for p in base_dir.iterdir() if p.is_file() and p.name != ".gitattributes")
    if storage.get_repo("model", BASE_ID) is None:
        storage.create_repo(RepoRecord("model", BASE_ID), author="openai")
        commit(storage, "model", BASE_ID, base_dir, [".gitattributes", "README.md", "config.json"], "add files", "valhalla")
        # An older conversion PR, on an earlier main: it must not be the one picked.
        commit(storage, "model", BASE_ID, base_dir / "pr", ["model.safetensors", ".gitattributes"], PR_TITLE,
                CONVERSION_BOT, pr_num=OLD_PR_NUM)
        commit(storage, "model", BASE_ID, base_dir, main_files, "Updates incorrect tokenizer configuration file (#13)",
                "lysandre")
        commit(storage, "model", BASE_ID, base_dir / "pr", ["model.safetensors", ".gitattributes"], PR_TITLE,
                CONVERSION_BOT, pr_num=PR_NUM)
    for repo_id in EXPERT_IDS:
        if storage.get_repo("model", repo_id) is None:
            storage.create_repo(RepoRecord("model", repo_id), author="tanganke")
            commit(storage, "model", repo_id, root / repo_id, ["README.md", "config.json", "model.safetensors"],
                    "Upload folder using huggingface_hub", "tanganke")


def commit(storage: HubStorage, repo_type: str, repo_id: str, folder: Path, files: list[str], title: str,
            author: str, pr_num: int | None = None) -> str:
    """Commit ``files`` of ``folder`` to ``main`` (or as pull request ``pr_num``); returns the commit id."""
    operations = []
    for name in files:
        data = (folder / name).read_bytes()
        if name.endswith(_LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            if storage.lfs_size(sha256) != len(data):
                storage.put_lfs(iter([data]), sha256, len(data))
            operations.append(("lfsFile", {"path": name, "oid": sha256, "size": len(data)}))
        else:
            operations.append(("file", {"path": name, "content": base64.b64encode(data).decode()}))
    commit, made = storage.commit(repo_type, repo_id, revision="main", author=author, title=title, message="",
                                  operations=operations, create_pr=pr_num is not None)
    if pr_num is not None and made != pr_num:
        with storage.repo_lock(repo_type, repo_id):
            refs = storage.read_refs(repo_type, repo_id)
            refs.pull_requests[str(pr_num)] = refs.pull_requests.pop(str(made))
            storage.write_refs(repo_type, repo_id, refs)
    return commit.id
