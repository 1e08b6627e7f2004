"""Small replicas of the paper's ViT-B/16 and ViT-L/14 repos, and of the ViT-B/16 LoRA experts.

Built like :mod:`hf_merge.testing.replicas` (same reduced widths: 32-wide, 2 layers; the real
patch sizes, image size, projection widths and so the real number of positions) and published
under the real repo ids. What is replicated, and where each fact comes from:

- Repo ids. ``openai/clip-vit-base-patch16`` and ``openai/clip-vit-large-patch14`` are the bases,
  ``tanganke/clip-vit-base-patch16_<task>`` / ``tanganke/clip-vit-large-patch14_<task>`` the full
  experts (FusionBench ``config/model/clip-vit/clip-vit-base-patch16_stanford-cars.yaml``,
  ``clip-vit-large-patch14_sun397.yaml``, ``clip-vit-large-patch14_eight_tasks.yaml`` and
  ``config/modelpool/CLIPVisionModelPool/clip-vit-base-patch16_TA8.yaml`` / ``clip-vit-large-patch14_TA8.yaml``),
  ``tanganke/clip-vit-base-patch16_<task>_lora-16`` the LoRA experts, on base
  ``openai/clip-vit-base-patch16`` (FusionBench ``config/modelpool/CLIPVisionModelPool/clip-vit-base-patch16_TA8_lora.yaml``).
  The 8 tasks and their order are those of the ViT-B/32 replicas.
- Full experts are ``CLIPVisionModel`` checkpoints: FusionBench loads them with
  ``transformers.CLIPVisionModel.from_pretrained`` (the model configs above). Their files, config
  fields and card follow the ViT-B/32 experts' (:mod:`hf_merge.testing.replicas`), with the
  architecture's patch size and projection width.
- Architecture fields: ViT-B/16 is ViT-B/32 with ``patch_size`` 16 (``projection_dim`` 512; vision
  768 wide, 12 layers; text 512 wide), ViT-L/14 has ``patch_size`` 14, ``projection_dim`` 768, a
  vision tower 1024 wide with 24 layers, 16 heads, 4096 intermediate and a text tower 768 wide,
  12 heads, 3072 intermediate (``kvmm/models/clip/config.py`` ``ClipVitBase16`` /
  ``ClipVitLarge14`` in the pypi mirror of kvmm 0.1.8; the ``openai/clip-vit-large-patch14`` text
  and vision configs quoted in diffusers ``text_encoder/config.json`` files and in open_flamingo
  configs). Image size 224 for both. The widths and depths are reduced here; ``projection_dim``,
  ``patch_size`` and ``image_size`` are kept (hf-merge compares them).
- LoRA experts: PEFT applied to the vision transformer itself (``CLIPVisionModel(...).vision_model``,
  "we apply lora on type CLIPVisionTransformer": FusionBench ``fusion_bench/models/linearized/vision_model.py``,
  ``load_lora_vision_model_hf``), so their tensors are named
  ``base_model.model.encoder.layers.<i>.self_attn.<q|v>_proj.lora_<A|B>.weight`` without the
  ``vision_model.`` prefix; rank 16, ``lora_alpha`` 32, ``target_modules`` ``[q_proj, v_proj]``,
  ``lora_dropout`` 0.1, ``bias`` none (FusionBench ``config/method/classification/clip_finetune.yaml``,
  ``lora_config``). Files ``adapter_config.json``, ``adapter_model.safetensors`` and a card with
  ``base_model`` and ``library_name: peft`` (what PEFT's ``save_pretrained`` writes).

Not confirmed from public material here, so chosen and marked: whether the bases' ``main`` holds
``model.safetensors`` (these replicas have it, beside ``pytorch_model.bin``, ``flax_model.msgpack``
and ``tf_model.h5`` placeholders that must never be downloaded; a pickle-only ``main`` is what the
ViT-B/32 replica covers), the bases' pull requests (none here), the LoRA repos' exact
``adapter_config.json`` beyond the fields above and their cards, and the experts' commit titles.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_merge.hub_server.storage import HubStorage, RepoRecord
from hf_merge.testing import replicas
from hf_merge.testing.replica_datasets import REAL_DATASETS
from hf_merge.testing.replicas import (
    HEADS,
    LAYERS,
    PLACEHOLDER,
    TASKS,
    WIDTH,
    publish_replicas,
)
from hf_merge.testing.tiny_clip import create_tiny_clip

_VERSION = 1
LORA_RANK, LORA_ALPHA = 16, 32
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                    "preprocessor_config.json")


@dataclass(frozen=True)
class PaperArchitecture:
    """One of the paper's CLIP architectures: its base repo, expert repos and kept config fields."""

    key: str
    base: str
    expert_prefix: str
    patch_size: int
    projection_dim: int
    description: str
    lora: bool = False

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(f"{self.expert_prefix}_{task}" for task in TASKS)

    @property
    def lora_experts(self) -> tuple[str, ...]:
        return tuple(f"{self.expert_prefix}_{task}_lora-16" for task in TASKS) if self.lora else ()


VIT_B16 = PaperArchitecture("b16", "openai/clip-vit-base-patch16", "tanganke/clip-vit-base-patch16", 16, 512,
                            "ViT-Base with patch size 16", lora=True)
VIT_L14 = PaperArchitecture("l14", "openai/clip-vit-large-patch14", "tanganke/clip-vit-large-patch14", 14, 768,
                            "ViT-Large with patch size 14")
ARCHITECTURES = (VIT_B16, VIT_L14)


@dataclass
class PaperReplicas:
    """What :func:`publish_paper_replicas` put on the Hub: repo id -> ``main`` commit of every
    base, full expert and LoRA expert, and the folder with their files."""

    folder: Path
    shas: dict[str, str] = field(default_factory=dict)


def build_paper_files(cache_dir: str | Path) -> Path:
    """Every repo's files under ``cache_dir`` (built once per content version)."""
    root = Path(cache_dir) / f"paper-replicas-v{_VERSION}"
    if root.is_dir():
        return root
    b32 = replicas.build_replica_files(cache_dir) / replicas.BASE_ID  # the OpenAI tokenizer files
    staging = Path(tempfile.mkdtemp(prefix=".building-paper-", dir=cache_dir))
    try:
        for arch in ARCHITECTURES:
            model, processor = _write_base(arch, b32, staging / arch.base)
            for task, repo_id in zip(TASKS, arch.experts, strict=False):
                dataset = next(d for d in REAL_DATASETS if d.task == task)
                replicas.write_expert(model, processor, task, dataset, staging / repo_id, base_id=arch.base,
                                       architecture=arch.description)
            for task, repo_id in zip(TASKS, arch.lora_experts, strict=False):
                dataset = next(d for d in REAL_DATASETS if d.task == task)
                _write_lora_expert(arch, model, processor, task, dataset, staging / repo_id)
        try:
            staging.rename(root)
        except OSError:  # built by another process meanwhile
            if not root.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def base_config(arch: PaperArchitecture) -> dict:
    """The base's ``config.json``: the CLIP config with this architecture's kept fields, reduced widths."""
    config = replicas.base_config()
    config["_name_or_path"] = arch.base
    config["projection_dim"] = arch.projection_dim
    config["text_config"]["projection_dim"] = arch.projection_dim
    config["vision_config"].update(patch_size=arch.patch_size, projection_dim=arch.projection_dim, image_size=224)
    return config


def _write_base(arch: PaperArchitecture, b32: Path, out: Path):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    out.mkdir(parents=True, exist_ok=True)
    config = base_config(arch)
    tiny, processor = create_tiny_clip(image_size=224, patch_size=arch.patch_size, hidden_size=WIDTH,
                                       num_layers=LAYERS, num_heads=HEADS, projection_dim=arch.projection_dim)
    with torch.random.fork_rng(devices=[]):
        model = CLIPModel(CLIPConfig.from_dict(config))
    missing = model.load_state_dict(tiny.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys
    model.eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    positions = (224 // arch.patch_size) ** 2 + 1  # 197 for B/16, 257 for L/14
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    state["vision_model.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for name in _TOKENIZER_FILES:
        shutil.copy(b32 / name, out / name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("pytorch_model.bin", "flax_model.msgpack", "tf_model.h5"):
        (out / name).write_bytes(PLACEHOLDER)
    (out / ".gitattributes").write_text(replicas.GITATTRIBUTES_BASE + "model.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    size = "B/16" if arch.patch_size == 16 else "L/14"
    (out / "README.md").write_text(replicas.BASE_CARD.replace("ViT-B/32", f"ViT-{size}"))
    return model, processor


class _LoraDelta(torch.nn.Module):
    """``W + scale · B·A`` as a parametrization of a linear layer's weight (B starts at zero, as in PEFT)."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float):
        super().__init__()
        self.lora_A = torch.nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A)


def _write_lora_expert(arch: PaperArchitecture, base_model, processor, task: str, dataset, out: Path) -> None:
    """A rank-16 LoRA adapter on the vision transformer's q/v projections, trained on the replica's
    train split, saved as PEFT saves it."""
    from safetensors.torch import save_file
    from torch.nn.utils import parametrize

    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(base_model)
    model.requires_grad_(False)
    deltas: dict[str, _LoraDelta] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for i, layer in enumerate(model.vision_model.encoder.layers):
            for proj in ("q_proj", "v_proj"):
                linear = getattr(layer.self_attn, proj)
                delta = _LoraDelta(linear.out_features, linear.in_features, LORA_RANK, LORA_ALPHA / LORA_RANK)
                parametrize.register_parametrization(linear, "weight", delta)
                deltas[f"encoder.layers.{i}.self_attn.{proj}"] = delta
    replicas.fine_tune(model, processor, task, dataset, [p for d in deltas.values() for p in d.parameters()], lr=2e-2)
    tensors = {}
    for module, delta in deltas.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = delta.lora_A.detach().clone().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = delta.lora_B.detach().clone().contiguous()
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config: dict[str, Any] = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": arch.base, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.1,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
        "r": LORA_RANK, "rank_pattern": {}, "revision": None, "target_modules": ["q_proj", "v_proj"],
        "task_type": None, "use_dora": False, "use_rslora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(
        f"---\nlibrary_name: peft\nbase_model: {arch.base}\n---\n# Model Card\n\n"
        f"A LoRA adapter (rank {LORA_RANK}) of the vision encoder of {arch.base}, fine-tuned on {task} (replica).\n"
    )


def publish_paper_replicas(storage: HubStorage, cache_dir: str | Path) -> PaperReplicas:
    """Build (or reuse) the replicas and publish them, with the 8 datasets, into a local Hub's
    storage as their owners would have. Existing repos are left as they are."""
    publish_replicas(storage, cache_dir, models=False)
    root = build_paper_files(cache_dir)
    shas: dict[str, str] = {}
    for arch in ARCHITECTURES:
        repos = [(arch.base, "openai")] + [(r, "tanganke") for r in arch.experts + arch.lora_experts]
        for repo_id, owner in repos:
            if storage.get_repo("model", repo_id) is None:
                folder = root / repo_id
                files = sorted(p.name for p in folder.iterdir() if p.is_file())
                storage.create_repo(RepoRecord("model", repo_id), author=owner)
                replicas.commit(storage, "model", repo_id, folder, files, "Upload folder using huggingface_hub", owner)
            shas[repo_id] = storage.read_refs("model", repo_id).branches["main"]
    return PaperReplicas(folder=root, shas=shas)
