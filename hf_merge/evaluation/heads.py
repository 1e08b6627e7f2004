"""Zero-shot classification heads built from CLIP's text tower, as in the CLIP paper.

For each class, every prompt template is embedded with the text tower and ``text_projection``
(``get_text_features(...).pooler_output``), each embedding is L2-normalised, the embeddings are
averaged and the mean is normalised again. Logits are ``exp(logit_scale) * cosine(image, class)``.

Merges change the vision tower only by default, so a head depends on the text tower alone:
:class:`HeadCache` keys heads by a fingerprint of the text-tower weights, the tokenizer's output
and the task's prompts, and computes each one once for a whole continual merge.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hf_merge.evaluation.tasks import Task
from hf_merge.log import get_logger

if TYPE_CHECKING:
    from transformers import CLIPModel

logger = get_logger(__name__)

# Parameters that determine the text embedding of a prompt.
_TEXT_PREFIXES = ("text_model.", "text_projection.")


@dataclass
class ZeroShotHead:
    """Normalised class embeddings of one task and the model's logit scale.

    Attributes:
        weight: ``(num_classes, projection_dim)`` float32 tensor, rows of unit norm.
        logit_scale: ``exp(model.logit_scale)``, the temperature CLIP was trained with.
    """

    weight: torch.Tensor
    logit_scale: float

    def logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``logit_scale * cosine`` between each image embedding and each class embedding."""
        image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
        return self.logit_scale * image_embeds @ self.weight.to(image_embeds.device).T


def text_tower_fingerprint(model: CLIPModel) -> str:
    """SHA-256 of every text-tower and text-projection tensor (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(_TEXT_PREFIXES):
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def class_embeddings(
    model: CLIPModel, tokenizer, task: Task, *, batch_size: int = 256, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(num_classes, dim)`` unit-norm class embeddings of ``task`` (see the module docstring)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prompts = [prompt for name in task.classes for prompt in task.prompts(name)]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        embeds = model.get_text_features(**tokens).pooler_output.float()
        chunks.append(torch.nn.functional.normalize(embeds, dim=-1))
    per_prompt = torch.cat(chunks).reshape(task.num_classes, len(task.templates), -1)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1).cpu()


def build_head(model: CLIPModel, tokenizer, task: Task, **kwargs) -> ZeroShotHead:
    """The zero-shot head of ``task`` for ``model`` (no cache)."""
    weight = class_embeddings(model, tokenizer, task, **kwargs)
    return ZeroShotHead(weight=weight, logit_scale=float(model.logit_scale.detach().exp().item()))


class HeadCache:
    """Zero-shot heads computed once and reused while the text tower is unchanged.

    Args:
        cache_dir: Optional folder where heads are also stored as safetensors files, so they
            survive the process (e.g. across ``hf-merge add`` runs).
    """

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._heads: dict[str, torch.Tensor] = {}
        # Weak keys: a fingerprint dies with its model, so a new model at the same address is re-hashed.
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.misses = 0

    def fingerprint(self, model: CLIPModel) -> str:
        """Text-tower fingerprint, remembered per model object while its weights keep their version."""
        # Hashing a ViT-L text tower takes a second; a model evaluated on 20 tasks is hashed once, and a
        # merged model updated in place is hashed again only if its text tower changed.
        version = sum(p._version for n, p in model.named_parameters() if n.startswith(_TEXT_PREFIXES))
        known = self._fingerprints.get(model)
        if known is None or known[0] != version:
            known = (version, text_tower_fingerprint(model))
            self._fingerprints[model] = known
        return known[1]

    def get(self, model: CLIPModel, tokenizer, task: Task, **kwargs) -> ZeroShotHead:
        """The head of ``task`` for ``model``, computed on first use."""
        key = self._key(model, tokenizer, task)
        weight = self._heads.get(key)
        if weight is None and self.cache_dir is not None and (self.cache_dir / f"{key}.safetensors").is_file():
            from safetensors.torch import load_file

            weight = load_file(self.cache_dir / f"{key}.safetensors")["weight"]
            self._heads[key] = weight
        if weight is None:
            self.misses += 1
            logger.info("Building the zero-shot head of %s (%d classes)", task.name, task.num_classes)
            weight = class_embeddings(model, tokenizer, task, **kwargs)
            self._heads[key] = weight
            if self.cache_dir is not None:
                from safetensors.torch import save_file

                self.cache_dir.mkdir(parents=True, exist_ok=True)
                save_file({"weight": weight.contiguous()}, str(self.cache_dir / f"{key}.safetensors"))
        return ZeroShotHead(weight=weight, logit_scale=float(model.logit_scale.detach().exp().item()))

    def _key(self, model: CLIPModel, tokenizer, task: Task) -> str:
        digest = hashlib.sha256(self.fingerprint(model).encode())
        digest.update(repr((task.name, task.classes, task.templates)).encode())
        # The tokenizer is part of the text pipeline: hash what it makes of the first prompts.
        digest.update(repr(tokenizer(task.prompts(task.classes[0]))["input_ids"]).encode())
        return digest.hexdigest()[:32]
