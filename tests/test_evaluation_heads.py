"""Zero-shot heads on a tiny CLIP: equal to the computation written out by hand, and cached."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPModel, CLIPProcessor

from hf_merge.evaluation import HeadCache, Task, build_head, text_tower_fingerprint
from hf_merge.evaluation.synthetic import solid_colors
from hf_merge.testing.tiny_clip import make_expert

TASK = Task("head-test", ("red", "green", "blue", "black"), ("a photo of a {}.", "a {} square.", "the colour {}."))


@pytest.fixture(scope="module")
def clip(tiny_base):
    return CLIPModel.from_pretrained(tiny_base).eval(), CLIPProcessor.from_pretrained(tiny_base)


@torch.no_grad()
def test_head_equals_direct_computation(clip):
    model, processor = clip
    head = build_head(model, processor.tokenizer, TASK)
    rows = []
    for name in TASK.classes:
        embeds = []
        for template in TASK.templates:
            ids = processor.tokenizer(template.replace("{}", name), return_tensors="pt")["input_ids"]
            pooled = model.text_model(input_ids=ids).pooler_output  # one prompt, no padding
            embed = model.text_projection(pooled)[0]
            embeds.append(embed / embed.norm())
        mean = torch.stack(embeds).mean(dim=0)
        rows.append(mean / mean.norm())
    expected = torch.stack(rows)
    assert head.weight.shape == (4, model.config.projection_dim)
    torch.testing.assert_close(head.weight, expected, rtol=0, atol=1e-5)
    assert head.logit_scale == pytest.approx(float(model.logit_scale.exp()))

    images, _ = solid_colors(n_per_class=1)
    pixels = processor.image_processor(images=images[:5], return_tensors="pt")["pixel_values"]
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    image = image / image.norm(dim=-1, keepdim=True)
    expected_logits = model.logit_scale.exp() * image @ expected.T
    logits = head.logits(model.get_image_features(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-4)


@torch.no_grad()
def test_single_template_head_reproduces_clip_forward(clip):
    model, processor = clip
    task = Task("one-template", ("red", "blue"), ("a photo of a {}.",))
    head = build_head(model, processor.tokenizer, task)
    images, _ = solid_colors(n_per_class=1)
    prompts = task.prompts("red") + task.prompts("blue")
    inputs = processor(text=prompts, images=images[:3], return_tensors="pt", padding=True)
    reference = model(**inputs).logits_per_image
    pixels = inputs["pixel_values"]
    logits = head.logits(model.get_image_features(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)


def test_cache_reuses_heads_while_text_tower_is_unchanged(clip, tiny_base, tmp_path):
    model, processor = clip
    cache = HeadCache(cache_dir=tmp_path / "heads")
    first = cache.get(model, processor.tokenizer, TASK)
    again = cache.get(model, processor.tokenizer, TASK)
    assert cache.misses == 1 and again.weight is first.weight

    vision_expert = CLIPModel.from_pretrained(make_expert(tiny_base, tmp_path / "v", seed=3, scale=0.5, scope="vision"))
    assert text_tower_fingerprint(vision_expert) == text_tower_fingerprint(model)
    cache.get(vision_expert, processor.tokenizer, TASK)
    assert cache.misses == 1  # a merged vision tower reuses the head

    text_expert = CLIPModel.from_pretrained(make_expert(tiny_base, tmp_path / "t", seed=3, scale=0.5, scope="text"))
    assert text_tower_fingerprint(text_expert) != text_tower_fingerprint(model)
    changed = cache.get(text_expert, processor.tokenizer, TASK)
    assert cache.misses == 2 and not torch.allclose(changed.weight, first.weight)

    other_task = Task("head-test", ("red", "green", "blue", "white"), TASK.templates)
    cache.get(model, processor.tokenizer, other_task)
    assert cache.misses == 3  # same name, other classes: another head

    fresh = HeadCache(cache_dir=tmp_path / "heads")  # a new process finds the heads on disk
    torch.testing.assert_close(fresh.get(model, processor.tokenizer, TASK).weight, first.weight)
    assert fresh.misses == 0

    with torch.no_grad():
        model.text_projection.weight.add_(0.5)  # in-place change: the fingerprint must follow
    try:
        cache.get(model, processor.tokenizer, TASK)
        assert cache.misses == 4
    finally:
        with torch.no_grad():
            model.text_projection.weight.sub_(0.5)
