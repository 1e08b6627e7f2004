"""Which tensors count as nn.Linear weights: the CLIP name table against the models themselves."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel

from hf_merge.io.validation import _linear_weights_of_model, linear_weight_names


def _meta_state(model_cls, config):
    with torch.device("meta"):
        model = model_cls(config)
    linears = {f"{m}.weight" for m, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return list(model.state_dict()), linears


@pytest.mark.parametrize(
    "model_cls, config",
    [
        (CLIPModel, CLIPConfig()),  # ViT-B/32 shape
        (CLIPModel, CLIPConfig(vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37},
                               text_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37})),
        (CLIPVisionModelWithProjection, CLIPVisionConfig()),
    ],
)
def test_clip_name_table_matches_the_modules(model_cls, config):
    names, linears = _meta_state(model_cls, config)
    table = linear_weight_names(config.to_dict(), names)
    assert table == frozenset(linears)
    assert _linear_weights_of_model(config.to_dict(), names) == table
    assert "vision_model.embeddings.patch_embedding.weight" not in table  # a convolution
    assert not any("layer_norm" in n or "embedding" in n for n in table)


def test_other_architectures_are_built_on_the_meta_device():
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    names, linears = _meta_state(ViTModel, config)
    found = linear_weight_names(config.to_dict(), names)
    assert found == frozenset(linears) and len(found) >= 6  # q, k, v, o, fc1, fc2 (+ pooler)
    assert not any("norm" in n or n.endswith(".bias") for n in found)


def test_unknown_architecture_uses_the_naming_rule():
    names = ["enc.0.proj.weight", "enc.0.proj.bias", "enc.norm.weight", "tok_embed.weight", "head.weight"]
    found = linear_weight_names({"model_type": "no-such-model"}, names)
    assert found == {"enc.0.proj.weight", "head.weight"}
