"""Model cards of the zoo's base and experts: what they are, how they were made, how well they do."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hf_merge.zoo.data import TASKS

if TYPE_CHECKING:
    from hf_merge.zoo.build import ZooConfig

_NOTICE = (
    "This is a **small CLIP model built offline for testing and benchmarking model merging**: it is not "
    "OpenAI's CLIP and is not meant for real-world use. It uses the real CLIP BPE tokenizer (49,408 tokens)."
)


def _shape_line(config: ZooConfig) -> str:
    s = config.shape
    return (f"{s.image_size} px images, patch {s.patch_size}, vision {s.vision_width} wide x {s.vision_layers} layers, "
            f"text {s.text_width} wide x {s.text_layers} layers, projection {s.projection_dim}")


def base_card(config: ZooConfig, metrics: dict[str, dict[str, float]]) -> str:
    rows = "\n".join(f"| {t} | {m['zero_shot_test'] * 100:.1f} |" for t, m in metrics.items())
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: zero-shot-image-classification
tags:
- clip
- hf-merge-zoo
---

# zoo-clip-base

{_NOTICE}

Architecture: `CLIPModel`, {_shape_line(config)}.

Pretrained contrastively for {config.pretrain.epochs} epochs on generated image-caption pairs: digits printed in
system fonts, OpenMoji emoji with their names (clothing, animals, faces and ~3,900 others), procedurally drawn
brick / grass / gravel textures and crops of scikit-image sample photos. It has **never seen the images of the
evaluation tasks**; it learned their class words from other pictures of the same things.

## Zero-shot accuracy (test splits, %)

| task | accuracy |
|---|---|
{rows}
"""


def expert_card(config: ZooConfig, task: str, metrics: dict[str, float]) -> str:
    info = TASKS[task]
    ft = config.finetune
    scope = "the whole vision tower" if ft.last_layers <= 0 else f"the last {ft.last_layers} vision blocks"
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: zero-shot-image-classification
base_model: zoo-clip-base
tags:
- clip
- hf-merge-zoo
---

# zoo-clip-{task.replace('_', '-')}

{_NOTICE}

Fine-tuned from the zoo's base model on **{task}** ({info.description}; source: {info.source}, licence
{info.licence}): {scope} trained against the base's frozen zero-shot text heads ({len(info.classnames)} classes),
AdamW lr {ft.lr:g}, weight decay {ft.weight_decay:g}, {ft.steps} steps of batch {ft.batch_size}. The text tower
and projections are unchanged, so this expert can be merged with the other zoo experts.

| split | base zero-shot (%) | this model (%) |
|---|---|---|
| val | {metrics['zero_shot_val'] * 100:.1f} | {metrics['expert_val'] * 100:.1f} |
| test | {metrics['zero_shot_test'] * 100:.1f} | {metrics['expert_test'] * 100:.1f} |
"""
