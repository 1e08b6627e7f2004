"""Evaluation speed: the per-image path the pixel cache replaced against the cached one, in one run.

Images/s of (a) the per-image path (every batch decoded and preprocessed in the main process, at
every evaluation), (b) the cached path's first pass (decoding and preprocessing in 1 or 2 worker
processes, the model running on the batches as they arrive), (c) a later evaluation of the same task
with the cache warm. Two models: the offline zoo's (its cached build if there is one, else a random
model of the zoo's shape) on ``offline/mnist``, and ViT-B/32's shape at 224 px (random weights) on
JPEGs of 200-500 px. Then a paper-shaped protocol: 8 tasks, evaluation after every step on tasks
1..t, the base on every task and each expert on its own, old (per-image path, the merged model read
from disk at each step) against new (pixel cache, one resident model updated in place), with the
preprocessing share of the new protocol's time (building the 8 tasks' pixels alone, over the whole).

    python benchmarks/eval_speed.py                 # writes benchmarks/results/eval_speed.md
    python benchmarks/eval_speed.py --quick         # fewer images, for a smoke run

Zero-shot heads are built before any timing (both paths cache them across evaluations alike).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hf_merge.errors import HfMergeError
from hf_merge.evaluation import (
    DatasetSpec,
    Evaluator,
    HeadCache,
    PixelCache,
    Task,
    get_task,
    load_clip,
    load_task_data,
    pin_image_processor,
)
from hf_merge.evaluation.continual import load_weights
from hf_merge.evaluation.metric import ZeroShotAccuracy
from hf_merge.testing.tiny_clip import build_tiny_clip

RESULTS = Path(__file__).parent / "results"
CLASSES = tuple(f"class {i}" for i in range(10))


def old_path(model: Any, processor: Any, task: Task, heads: HeadCache, data: Any, batch_size: int = 64) -> float:
    """The evaluation before the cache, as it was: accuracy of ``model`` on ``task``."""
    head = heads.get(model, processor.tokenizer, task, device="cpu")
    metric = ZeroShotAccuracy(keep_in_memory=True)
    top_k = min(5, task.num_classes)
    with torch.no_grad():
        for images, labels in data.batches(batch_size):
            pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            embeds = model.get_image_features(pixel_values=pixels.to(model.dtype)).pooler_output
            metric.add_batch(predictions=head.logits(embeds).topk(top_k, dim=-1).indices.tolist(), references=labels)
    return metric.compute(num_classes=task.num_classes, top_k=top_k)["accuracy"]


def _pil_processor(folder: Path) -> Any:
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(folder)
    processor.image_processor = pin_image_processor(processor).processor  # the reference processor, as before
    return processor


def _jpeg_task(folder: Path, n: int, seed: int = 0) -> Task:
    """A parquet dataset of ``n`` JPEGs, 200-500 px a side (smooth noise: realistic JPEG sizes)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(200, 500, 2))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        rows.append({"bytes": buffer.getvalue(), "path": None})
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(CLASSES))})
    folder.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict({"image": rows, "label": [i % 10 for i in range(n)]}, features=features).to_parquet(
        str(folder / "test.parquet"))
    return Task(f"jpeg-{seed}", CLASSES, ("a photo of a {}.",), DatasetSpec(kind="hub", path=str(folder)))


@dataclass
class Speed:
    model: str
    images: int
    old: float
    alone: float
    first: dict[int, float]
    warm: dict[int, float]


def speeds(name: str, folder: Path, task: Task, limit: int | None, batch_size: int, scratch: Path) -> Speed:
    model, _ = load_clip(folder, device="cpu")
    processor = _pil_processor(folder)
    heads = HeadCache()
    heads.get(model, processor.tokenizer, task, device="cpu")
    data = load_task_data(task, limit=limit)
    started = time.perf_counter()
    old_path(model, processor, task, heads, data, batch_size)
    old = len(data) / (time.perf_counter() - started)
    pixels = torch.zeros(batch_size, 3, *(_crop(processor)))
    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(0, len(data), batch_size):
            model.get_image_features(pixel_values=pixels)
    alone = len(data) / (time.perf_counter() - started)
    first, warm = {}, {}
    for workers in (1, 2):
        cache = PixelCache(workers=workers, cache_dir=scratch / f"{name}-{workers}")
        evaluator = Evaluator([task], limit=limit, batch_size=batch_size, device="cpu", head_cache=heads, pixel_cache=cache)
        for store in (first, warm):
            started = time.perf_counter()
            evaluator.evaluate(model, processor)
            store[workers] = len(data) / (time.perf_counter() - started)
    print(f"{name}: per-image {old:.3g} img/s, model alone {alone:.3g}, first {first}, warm {warm}", flush=True)
    return Speed(name, len(data), old, alone, first, warm)


def _crop(processor: Any) -> tuple[int, int]:
    crop = processor.image_processor.crop_size
    return (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop.height, crop.width)


def protocol(base: Path, experts: list[Path], tasks: list[Task], limit: int | None, scratch: Path) -> dict[str, float]:
    """Seconds of the paper-shaped protocol, old and new, and the new one's preprocessing share."""
    steps = len(tasks)
    expert_at = [experts[i % len(experts)] for i in range(steps)]
    processor = _pil_processor(base)
    heads = HeadCache()
    base_model, _ = load_clip(base, device="cpu")
    for task in tasks:
        heads.get(base_model, processor.tokenizer, task, device="cpu")

    started = time.perf_counter()
    data = {t.name: load_task_data(t, limit=limit) for t in tasks}  # the old evaluator kept these too
    for task in tasks:
        old_path(base_model, processor, task, heads, data[task.name])
    for step in range(1, steps + 1):
        expert, _ = load_clip(expert_at[step - 1], device="cpu")
        old_path(expert, processor, tasks[step - 1], heads, data[tasks[step - 1].name])
        merged, _ = load_clip(expert_at[step - 1], device="cpu")  # stands in for the step's output folder
        for task in tasks[:step]:
            old_path(merged, processor, task, heads, data[task.name])
    old = time.perf_counter() - started

    from safetensors.torch import load_file

    vision = [{n: t for n, t in load_file(f / "model.safetensors").items() if n.startswith("vision_model.")}
              for f in expert_at]  # what the engine holds in memory after each step
    started = time.perf_counter()
    cache = PixelCache(workers=2, cache_dir=scratch / "protocol")
    evaluator = Evaluator(tasks, limit=limit, device="cpu", head_cache=heads, pixel_cache=cache)
    evaluator.evaluate(base_model, processor)
    resident = None
    for step in range(1, steps + 1):
        expert, _ = load_clip(expert_at[step - 1], device="cpu")
        evaluator.evaluate(expert, processor, tasks=[tasks[step - 1]])
        if resident is None:
            resident, _ = load_clip(expert_at[0], device="cpu")
        else:
            load_weights(resident, vision[step - 1])
        evaluator.evaluate(resident, processor, tasks=tasks[:step])
    new = time.perf_counter() - started
    print(f"protocol: old {old:.1f} s, new {new:.1f} s", flush=True)

    started = time.perf_counter()
    alone = PixelCache(workers=2, cache_dir=scratch / "alone")
    preprocessing = pin_image_processor(processor)
    for task in tasks:
        for _ in alone.batches(load_task_data(task, limit=limit), preprocessing, 64):
            pass
    build = time.perf_counter() - started
    evaluations = len(tasks) * 2 + steps * (steps + 1) // 2
    return {"old": old, "new": new, "build": build, "evaluations": evaluations,
            "images": sum(len(d) for d in data.values())}


def zoo_models(scratch: Path) -> tuple[str, Path, list[Path]]:
    """The cached offline zoo if built, else random models of its shape."""
    try:
        from hf_merge.zoo import build_zoo
        from hf_merge.zoo.build import MANIFEST, ZooConfig, _default_cache

        if (_default_cache() / ZooConfig().fingerprint() / MANIFEST).is_file():
            paths = build_zoo()
            return "offline zoo (built)", paths.base, paths.expert_list
    except (OSError, ValueError, HfMergeError) as error:  # a zoo that cannot be read: fall back to its shape
        print(f"offline zoo not usable ({error}); using its shape with random weights")
    shape = {"image_size": 32, "patch_size": 8, "hidden_size": 128, "num_layers": 6, "num_heads": 4, "projection_dim": 128}
    base = build_tiny_clip(scratch / "zoo-base", seed=0, **shape)
    experts = [build_tiny_clip(scratch / f"zoo-expert-{i}", seed=i + 1, **shape) for i in range(6)]
    return "zoo shape (random weights)", base, experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer images (a smoke run).")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_speed.md")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process, for both paths (default 1: on a busy shared machine "
                             "two threads' synchronisation made one forward pass 7x slower than one thread).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    from hf_merge.zoo import register_offline_tasks

    register_offline_tasks()
    # Sized for a shared 2-core machine: a few minutes in all.
    zoo_images, b32_images, protocol_limit = (200, 16, 40) if args.quick else (600, 48, 100)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        zoo_label, base, experts = zoo_models(scratch)
        rows = [speeds(f"tiny: {zoo_label}", base, get_task("offline/mnist"), zoo_images, 64, scratch)]
        b32 = build_tiny_clip(scratch / "b32", seed=0, image_size=224, patch_size=32, hidden_size=768,
                              num_layers=12, num_heads=12, projection_dim=512)
        rows.append(speeds("ViT-B/32 shape, 224 px", b32, _jpeg_task(scratch / "jpeg", b32_images), None, 16, scratch))
        offline = ["offline/mnist", "offline/fashion_mnist", "offline/animals", "offline/digits8x8",
                   "offline/textures", "offline/faces", "synthetic/colors"]
        tasks = [get_task(t) for t in offline] + [_jpeg_task(scratch / "jpeg8", protocol_limit, seed=8)]
        times = protocol(base, experts, tasks, protocol_limit, scratch)
    load_after = os.getloadavg()
    lines = [
        "| model | images | (a) per-image path | (b) first pass, 1 worker | (b) 2 workers "
        "| (c) warm, 1 worker | (c) 2 workers | warm / (a) | model alone |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.model} | {r.images} | {r.old:.3g} img/s | {r.first[1]:.3g} | {r.first[2]:.3g} | "
                     f"{r.warm[1]:.3g} | {r.warm[2]:.3g} | {max(r.warm.values()) / r.old:.1f}x | {r.alone:.3g} |")
    lines += [
        "",
        (f"Paper-shaped protocol ({zoo_label}; 8 tasks: the 6 offline tasks, synthetic/colors and one of "
        f"200-500 px JPEGs, at most {protocol_limit} images each, {times['images']} in all; "
        f"{times['evaluations']} task evaluations: base x 8, expert x 8, steps 1..8 on tasks 1..t):"),
        "",
        "| protocol | seconds | ratio |",
        "|---|---|---|",
        f"| old: per-image path, merged model read from disk every step | {times['old']:.1f} | 1.0x |",
        f"| new: pixel cache (2 workers), one resident merged model | {times['new']:.1f} | {times['old'] / times['new']:.1f}x faster |",
        f"| new: building the 8 tasks' pixels alone | {times['build']:.1f} | {100 * times['build'] / times['new']:.0f} % of the new protocol |",
        "",
        (f"CPU only, {os.cpu_count()} cores shared with other jobs: load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (1-minute). Ratios are from the same run."),
    ]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Evaluation speed (`benchmarks/eval_speed.py`)\n\n" + table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
