"""Small CLIP models for the zoo: shapes, compact-vocabulary training copies, zero-shot heads, accuracy.

Pretraining only ever sees a few thousand distinct tokens, yet the saved model must carry CLIP's full
49,408-token embedding (so the real tokenizer works). Training a compact embedding of the used rows
and scattering it into the full table at save time avoids AdamW touching 6M unused weights per step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hf_merge.zoo.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, write_clip_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ModelShape:
    """Architecture of the zoo's CLIP model."""

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 6
    text_width: int = 128
    text_layers: int = 2
    heads: int = 4
    projection_dim: int = 128
    context_length: int = 32

    def clip_config(self, vocab_size: int = VOCAB_SIZE, bos: int = BOS_ID, eos: int = EOS_ID):
        from transformers import CLIPConfig

        text = dict(vocab_size=vocab_size, hidden_size=self.text_width, intermediate_size=4 * self.text_width,
                    num_hidden_layers=self.text_layers, num_attention_heads=self.heads,
                    max_position_embeddings=self.context_length, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
        vision = dict(hidden_size=self.vision_width, intermediate_size=4 * self.vision_width,
                      num_hidden_layers=self.vision_layers, num_attention_heads=self.heads,
                      image_size=self.image_size, patch_size=self.patch_size)
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.projection_dim)


def to_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> normalised float ``(N, 3, H, W)``, as ``CLIPImageProcessor`` does."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return normalise(x)


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class TokenMap:
    """Maps full CLIP token ids to a compact range (id 0..K-1) and back."""

    def __init__(self, used_ids: np.ndarray):
        ids = np.unique(np.concatenate([np.asarray(used_ids).ravel(), [BOS_ID, EOS_ID]]))
        self.full_ids = ids
        self.lookup = np.full(VOCAB_SIZE, np.searchsorted(ids, EOS_ID), np.int64)
        self.lookup[ids] = np.arange(len(ids))

    def __len__(self) -> int:
        return len(self.full_ids)

    def compact(self, full: np.ndarray) -> np.ndarray:
        return self.lookup[full]


def tokenize(tokenizer, texts: list[str], context_length: int) -> np.ndarray:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=context_length)
    return np.asarray(enc["input_ids"], np.int64)


def expand_vocabulary(compact_model, token_map: TokenMap, shape: ModelShape, seed: int):
    """A full-vocabulary ``CLIPModel`` holding ``compact_model``'s weights."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    full = CLIPModel(shape.clip_config())
    state = compact_model.state_dict()
    key = "text_model.embeddings.token_embedding.weight"
    table = full.state_dict()[key].clone()
    table[torch.as_tensor(token_map.full_ids)] = state[key]
    state[key] = table
    full.load_state_dict(state)
    return full


def save_clip(model, out_dir: str | Path, shape: ModelShape, card: str | None = None,
              extra_files: dict[str, str] | None = None) -> Path:
    """Save in the Hub layout: safetensors weights, config, processor and the real CLIP tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor = {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_resize": True, "size": {"shortest_edge": shape.image_size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": shape.image_size, "width": shape.image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    write_clip_tokenizer(out, model_max_length=shape.context_length)
    if card is not None:
        (out / "README.md").write_text(card, encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text, encoding="utf-8")
    return out


@torch.no_grad()
def class_heads(model, tokenizer, classnames, templates, context_length: int) -> torch.Tensor:
    """Zero-shot heads as in the paper: per class, normalised template embeddings averaged, renormalised."""
    model.eval()
    rows = []
    for c in classnames:
        ids = torch.as_tensor(tokenize(tokenizer, [t.format(c) for t in templates], context_length))
        # No attention mask needed: the text tower is causal and pools at the first end-of-text token,
        # so the padding after it never reaches the pooled position.
        emb = model.get_text_features(input_ids=ids)
        emb = getattr(emb, "pooler_output", emb)
        emb = F.normalize(emb, dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


def image_embeddings(model, pixels: torch.Tensor, batch: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(pixels), batch):
        emb = model.get_image_features(pixel_values=pixels[i : i + batch])
        out.append(F.normalize(getattr(emb, "pooler_output", emb), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def accuracy(model, heads: torch.Tensor, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    emb = image_embeddings(model, to_pixels(images))
    pred = (emb @ heads.T).argmax(-1).numpy()
    return float((pred == np.asarray(labels)).mean())


def shape_dict(shape: ModelShape) -> dict:
    return asdict(shape)
