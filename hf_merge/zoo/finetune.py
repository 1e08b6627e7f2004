"""Fine-tune one expert per task: the vision tower against the base's frozen zero-shot class heads."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hf_merge.zoo.modeling import image_embeddings, to_pixels


@dataclass(frozen=True)
class FinetuneConfig:
    """Expert fine-tuning settings (the paper's recipe: vision tower only, text heads frozen)."""

    steps: int = 150
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.1
    l2sp: float = 0.0  # pull toward the base weights (L2-SP); keeps experts in the base's basin
    last_layers: int = 0  # 0: whole vision tower; k: only the last k blocks (+ post-layernorm)


def trainable_vision_parameters(model, last_layers: int) -> list[tuple[str, torch.nn.Parameter]]:
    vision = model.vision_model
    if last_layers <= 0:
        return [(f"vision_model.{n}", p) for n, p in vision.named_parameters()]
    n_layers = len(vision.encoder.layers)
    keep = [f"encoder.layers.{i}." for i in range(n_layers - last_layers, n_layers)] + ["post_layernorm."]
    return [(f"vision_model.{n}", p) for n, p in vision.named_parameters() if any(n.startswith(k) for k in keep)]


def finetune(base, heads: torch.Tensor, images: np.ndarray, labels: np.ndarray, config: FinetuneConfig, seed: int = 0):
    """Return a fine-tuned copy of ``base`` (only vision-tower weights change)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    params = trainable_vision_parameters(model, config.last_layers)
    for _, p in params:
        p.requires_grad_(True)
    anchors = [p.detach().clone() for _, p in params]
    opt = torch.optim.AdamW([p for _, p in params], lr=config.lr, weight_decay=config.weight_decay)
    pixels = to_pixels(images)
    y = torch.as_tensor(labels)
    scale = model.logit_scale.exp().detach()
    model.train()
    for _step in range(config.steps):
        sel = torch.randint(0, len(pixels), (config.batch_size,), generator=gen)
        x = pixels[sel]
        # +-2 px shifts: cheap augmentation that keeps small tasks from being memorised.
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        logits = scale * image_embeddings(model, x) @ heads.T
        loss = F.cross_entropy(logits, y[sel])
        if config.l2sp > 0:
            loss = loss + config.l2sp * sum(((p - a) ** 2).sum() for (_, p), a in zip(params, anchors, strict=False))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
