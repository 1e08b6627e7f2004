"""Contrastive pretraining of the zoo's base CLIP model on the offline image-caption corpus."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hf_merge.log import get_logger
from hf_merge.zoo.corpus import Corpus
from hf_merge.zoo.modeling import ModelShape, TokenMap, expand_vocabulary, normalise, tokenize

logger = get_logger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """Optimisation settings of the base model's contrastive pretraining."""

    epochs: int = 8
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    elastic: float = 0.0  # strength of the random elastic distortion (grid units; 0.1 is strong)


def augment(bank: torch.Tensor, pixelate: torch.Tensor, size: int, gen: torch.Generator, elastic: float = 0.0) -> torch.Tensor:
    """Random zoom / rotation / shift / contrast of 64 px bank images, down to ``size`` px in [0, 1]."""
    n = len(bank)
    scale = 0.75 + 0.45 * torch.rand(n, generator=gen)  # >1 zooms out
    angle = (torch.rand(n, generator=gen) - 0.5) * (math.pi / 7)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.3
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, [n, 3, 64, 64], align_corners=False)
    if elastic > 0:
        # A smooth random displacement field: printed glyphs and emoji wobble like handwriting.
        coarse = (torch.rand(n, 2, 5, 5, generator=gen) - 0.5) * (2 * elastic)
        grid = grid + F.interpolate(coarse, size=(64, 64), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    x = F.grid_sample(bank, grid, padding_mode="zeros", align_corners=False)
    x = F.interpolate(x, size=(size, size), mode="area")
    if pixelate.any():
        small = F.interpolate(x[pixelate], size=(8, 8), mode="area")
        x[pixelate] = F.interpolate(small, size=(size, size), mode="nearest")
    gain = 0.7 + 0.5 * torch.rand(n, 1, 1, 1, generator=gen)
    return (x * gain).clamp(0, 1)


def pretrain(corpus: Corpus, tokenizer, shape: ModelShape, config: PretrainConfig, seed: int = 0,
             extra_texts: Sequence[str] = ()):
    """Train a CLIP model from scratch on ``corpus``; returns a full-vocabulary ``CLIPModel``.

    ``extra_texts`` (the tasks' prompts) only reserve their tokens in the compact vocabulary, so that
    their embeddings come out of training rather than from the random initialisation.
    """
    from transformers import CLIPModel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    full_ids = tokenize(tokenizer, list(corpus.captions), shape.context_length)
    extra_ids = tokenize(tokenizer, list(extra_texts), shape.context_length) if extra_texts else np.zeros((0,), np.int64)
    token_map = TokenMap(np.concatenate([full_ids.ravel(), extra_ids.ravel()]))
    ids = torch.as_tensor(token_map.compact(full_ids))
    eos = int(token_map.compact(np.array([49407]))[0])
    bos = int(token_map.compact(np.array([49406]))[0])
    model = CLIPModel(shape.clip_config(vocab_size=len(token_map), bos=bos, eos=eos))
    bank = torch.as_tensor(corpus.bank).permute(0, 3, 1, 2).float() / 255.0
    index = torch.as_tensor(corpus.bank_index)
    pix = torch.as_tensor(corpus.pixelate)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = max(1, len(ids) // config.batch_size)
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / config.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    model.train()
    start = time.time()
    step = 0
    for epoch in range(config.epochs):
        order = torch.randperm(len(ids), generator=gen)
        for b in range(steps_per_epoch):
            sel = order[b * config.batch_size : (b + 1) * config.batch_size]
            pixels = normalise(augment(bank[index[sel]], pix[sel], shape.image_size, gen, config.elastic))
            out = model(input_ids=ids[sel], pixel_values=pixels, return_loss=True)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
        logger.info("pretrain epoch %d/%d loss %.3f (%.0fs)", epoch + 1, config.epochs, out.loss.item(), time.time() - start)
    return expand_vocabulary(model, token_map, shape, seed)
