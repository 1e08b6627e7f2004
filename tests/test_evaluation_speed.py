"""Evaluation through the pixel cache: the same predictions as the per-image path it replaced, a cache
keyed by processor and dataset revision, undecodable images skipped and counted, out-of-memory
batches halved, the pinned PIL processor, and one resident merged model updated by the engine."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from hf_merge.errors import EvaluationError
from hf_merge.evaluation import (
    ContinualEvaluator,
    DatasetSpec,
    Evaluator,
    PixelCache,
    Task,
    build_head,
    evaluate_models,
    load_clip,
    load_task_data,
    pin_image_processor,
)
from hf_merge.evaluation.metric import ZeroShotAccuracy
from hf_merge.evaluation.preprocessing import PixelLookup

CLASSES = ("dark", "mid", "light")
TEMPLATES = ("a {} square.", "a photo of something {}.")


def _varied_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Images of other sizes, aspect ratios and modes than the model's input: resize and crop do work."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        height, width = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        images.append(image.convert(("RGB", "L", "RGBA", "P")[i % 4]))
    return images


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _hub_task(folder, images: list[bytes], labels: list[int], name: str = "varied") -> Task:
    """A local parquet dataset, read through ``datasets`` as a Hub dataset is."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    folder.mkdir(parents=True, exist_ok=True)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(CLASSES))})
    rows = {"image": [{"bytes": b, "path": None} for b in images], "label": labels}
    Dataset.from_dict(rows, features=features).to_parquet(str(folder / "test.parquet"))
    return Task(name, CLASSES, TEMPLATES, DatasetSpec(kind="hub", path=str(folder)))


@pytest.fixture
def varied_task(tmp_path):
    images = _varied_images(150)
    return _hub_task(tmp_path / "varied", [_png(im) for im in images], [i % 3 for i in range(150)])


@pytest.fixture
def folder_task(tmp_path):
    root = tmp_path / "folder"
    for i, image in enumerate(_varied_images(40, seed=3)):
        (root / CLASSES[i % 3]).mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(root / CLASSES[i % 3] / f"{i:03d}.png")
    return Task("folder", CLASSES, TEMPLATES, DatasetSpec(kind="imagefolder", path=str(root)))


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MERGE_CACHE", str(tmp_path / "cache"))


def _pil_processor(folder):
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls.from_pretrained(folder)


@torch.no_grad()
def per_image_path(model, folder, task, *, limit=None, batch_size=64):
    """The evaluation as it was before the cache: each batch of images decoded and preprocessed in
    this process by the PIL processor, then encoded; returns the ranked predictions and the metric."""
    from transformers import CLIPProcessor

    image_processor = _pil_processor(folder)
    head = build_head(model, CLIPProcessor.from_pretrained(folder).tokenizer, task)
    data = load_task_data(task, limit=limit)
    top_k = min(5, task.num_classes)
    ranked = []
    metric = ZeroShotAccuracy(keep_in_memory=True)
    for images, labels in data.batches(batch_size):
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
        embeds = model.get_image_features(pixel_values=pixels.to(model.dtype)).pooler_output
        batch = head.logits(embeds).topk(top_k, dim=-1).indices.tolist()
        ranked.extend(batch)
        metric.add_batch(predictions=batch, references=labels)
    result = metric.compute(num_classes=task.num_classes, top_k=top_k)
    result["top5_accuracy"] = result.pop(f"top{top_k}_accuracy")
    return ranked, result


@pytest.mark.parametrize(("workers", "memory_budget"), [(0, 2**30), (2, 2**30), (2, 0)])
def test_predictions_are_those_of_the_per_image_path(tiny_base, varied_task, folder_task, workers, memory_budget):
    model, _ = load_clip(tiny_base, device="cpu")
    cache = PixelCache(workers=workers, memory_budget=memory_budget)
    evaluator = Evaluator([varied_task, folder_task, "synthetic/colors"], device="cpu", pixel_cache=cache)
    for task in evaluator.tasks:
        expected_ranked, expected = per_image_path(model, tiny_base, task)
        for _ in range(2):  # first pass builds the cache, the second reads it
            ranked, _labels, undecodable = evaluator.predictions(model, load_clip(tiny_base, device="cpu")[1], task)
            assert ranked == expected_ranked and undecodable == 0
        result = evaluator.evaluate(model, tasks=[task])[task.name]
        assert {k: result[k] for k in expected} == expected
    assert cache.builds == 3
    stored = [s for s in cache._sets.values()]
    assert all(s.lookup is not None and s.pixels.dtype == np.uint8 for s in stored)  # crops, not floats
    assert all(s.location != "memory" for s in stored) == (memory_budget == 0)


def test_float_storage_when_the_lookup_cannot_rebuild_the_pixels(tiny_base, varied_task, monkeypatch):
    model, _ = load_clip(tiny_base, device="cpu")
    expected_ranked, _ = per_image_path(model, tiny_base, varied_task, batch_size=16)
    monkeypatch.setattr(PixelLookup, "of", classmethod(lambda cls, processor, channels=3: None))
    evaluator = Evaluator([varied_task], device="cpu", batch_size=16, workers=2)
    processor = load_clip(tiny_base, device="cpu")[1]
    assert evaluator.predictions(model, processor, varied_task)[0] == expected_ranked
    (stored,) = evaluator.pixel_cache._sets.values()
    assert stored.lookup is None and stored.pixels.dtype == np.float32


def test_lookup_equals_the_processor_on_every_byte(tiny_base):
    processor = _pil_processor(tiny_base)
    lookup = PixelLookup.of(processor)
    crops = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(1, 3, 2, 2)  # (1, 3, 32, 32)
    image = Image.fromarray(crops[0].permute(1, 2, 0).numpy())
    expected = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(lookup(crops), expected)


def _disk_cache() -> PixelCache:
    return PixelCache(workers=0, memory_budget=0)  # every set memory-mapped: visible to the next "run"


def test_cache_is_reused_only_under_the_same_processor_and_dataset_revision(tiny_base, tmp_path):
    model, processor = load_clip(tiny_base, device="cpu")
    images = [_png(im) for im in _varied_images(40)]
    labels = [i % 3 for i in range(40)]
    task = _hub_task(tmp_path / "ds", images, labels)

    def run(processor, task=task):
        cache = _disk_cache()
        evaluator = Evaluator([task], device="cpu", pixel_cache=cache)
        ranked = evaluator.predictions(model, processor, task)[0]
        (stored,) = cache._sets.values()
        return cache.builds, stored.key, ranked

    builds, key, ranked = run(processor)
    assert builds == 1
    assert run(processor) == (0, key, ranked)  # a later run reads the memory-mapped pixels

    # Another processor config: other pixels, never the stored ones.
    other = load_clip(tiny_base, device="cpu")[1]
    other.image_processor.image_mean = [0.2, 0.3, 0.4]
    builds, other_key, _ = run(other)
    assert builds == 1 and other_key != key
    assert run(processor)[:2] == (0, key)  # each config keeps its own set

    # Another revision of the dataset (its files changed): rebuilt, never read from the old set.
    changed = images[:-1] + [_png(Image.new("RGB", (33, 47), "white"))]
    builds, revised_key, _ = run(processor, _hub_task(tmp_path / "ds", changed, labels))
    assert builds == 1 and revised_key != key

    # The revision named in the spec is part of the key, whatever the files.
    data = load_task_data(task)
    pinned = load_task_data(Task(task.name, task.classes, task.templates,
                                 DatasetSpec(kind="hub", path=task.dataset.path, revision="abc123")))
    preprocessing = pin_image_processor(processor)
    assert _disk_cache().key(data, preprocessing) != _disk_cache().key(pinned, preprocessing)


def test_undecodable_images_are_skipped_counted_and_named(tiny_base, tmp_path, caplog):
    good = _varied_images(30)
    images = [_png(im) for im in good]
    images[7] = b"not an image"
    images[21] = _png(good[21])[:40]  # truncated
    labels = [i % 3 for i in range(30)]
    task = _hub_task(tmp_path / "bad", images, labels, name="bad")
    model, processor = load_clip(tiny_base, device="cpu")
    with caplog.at_level(logging.WARNING, logger="hf_merge"):
        result = Evaluator([task], device="cpu", workers=2).evaluate(model, processor)["bad"]
    assert result["undecodable"] == 2 and result["num_samples"] == 28
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "image 7," in warnings[0] and "image 21," in warnings[1]
    assert "0x" not in warnings[0]  # the reason without object addresses
    # The other 28 are scored as the per-image path scores them.
    kept = [i for i in range(30) if i not in (7, 21)]
    clean = _hub_task(tmp_path / "clean", [_png(good[i]) for i in kept], [labels[i] for i in kept], name="bad")
    _, expected = per_image_path(model, tiny_base, clean)
    assert result["accuracy"] == expected["accuracy"] and result["per_class_accuracy"] == expected["per_class_accuracy"]

    nothing = _hub_task(tmp_path / "none", [b"junk", b"junk"], [0, 1], name="none")
    with pytest.raises(EvaluationError, match="none of its 2 images could be decoded"):
        Evaluator([nothing], device="cpu", workers=0).evaluate(model, processor)


def test_out_of_memory_halves_the_batch_and_says_so_once(tiny_base, varied_task, monkeypatch, caplog):
    model, processor = load_clip(tiny_base, device="cpu")
    expected = Evaluator([varied_task], device="cpu", batch_size=64, workers=0).evaluate(model, processor)
    encode = model.get_image_features
    sizes = []

    def small_gpu(pixel_values):
        sizes.append(len(pixel_values))
        if len(pixel_values) > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return encode(pixel_values=pixel_values)

    monkeypatch.setattr(model, "get_image_features", small_gpu)
    with caplog.at_level(logging.WARNING, logger="hf_merge"):
        result = Evaluator([varied_task], device="cpu", batch_size=64, workers=0).evaluate(model, processor)
    warnings = [r.getMessage() for r in caplog.records if "Out of GPU memory" in r.getMessage()]
    assert warnings == ["Out of GPU memory at batch size 64: continuing with batches of 32"]
    assert sizes[:2] == [64, 32] and max(sizes[2:]) == 16  # halved until it fit, then kept
    assert result[varied_task.name]["accuracy"] == expected[varied_task.name]["accuracy"]
    assert result[varied_task.name]["per_class_accuracy"] == expected[varied_task.name]["per_class_accuracy"]


def test_the_pil_processor_is_pinned(tiny_base):
    import importlib.util

    from transformers import CLIPProcessor

    loaded = CLIPProcessor.from_pretrained(tiny_base)
    pinned = pin_image_processor(loaded)
    assert pinned.backend == "pil" and pinned.name in ("CLIPImageProcessorPil", "CLIPImageProcessor")
    assert "PIL, as the reference" in pinned.label
    assert pinned.processor.to_dict()["crop_size"] == loaded.image_processor.to_dict()["crop_size"]
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(EvaluationError, match="needs torchvision"):
            pin_image_processor(loaded, fast=True)
    else:
        fast = pin_image_processor(loaded, fast=True)
        assert fast.backend == "torchvision" and fast.fingerprint() != pinned.fingerprint()


def test_several_models_share_one_preprocessing(tiny_base, tiny_experts, varied_task):
    cache = PixelCache(workers=0)
    models = [str(tiny_base), str(tiny_experts[0]), str(tiny_experts[1])]
    results = evaluate_models(models, [varied_task, "synthetic/colors"], device="cpu", pixel_cache=cache)
    assert cache.builds == 2  # one per task, for three models
    for folder, result in zip(models, results, strict=False):
        model, _ = load_clip(folder, device="cpu")
        assert result[varied_task.name]["accuracy"] == per_image_path(model, folder, varied_task)[1]["accuracy"]


def test_eval_dtype_runs_the_forward_pass_in_bfloat16(tiny_base, varied_task):
    evaluator = Evaluator([varied_task], device="cpu", dtype="bfloat16", workers=0)
    model, processor = evaluator.prepare(str(tiny_base))
    assert model.dtype == torch.bfloat16
    result = evaluator.evaluate(model, processor)[varied_task.name]
    assert result["num_samples"] == 150 and 0.0 <= result["accuracy"] <= 1.0
    with pytest.raises(EvaluationError, match="eval dtype must be one of"):
        Evaluator([varied_task], dtype="float64")


def test_engine_updates_one_resident_model(tiny_base, tiny_experts, tmp_path, monkeypatch):
    from hf_merge.evaluation import runner
    from hf_merge.merging.engine import ContinualMerger

    loads = []
    original = runner.load_clip
    monkeypatch.setattr(runner, "load_clip", lambda model, **kw: loads.append(str(model)) or original(model, **kw))
    tasks = ["synthetic/colors"] * 3
    evaluator = ContinualEvaluator(tasks, evaluator=Evaluator(tasks, limit=24, device="cpu", workers=0))
    out = tmp_path / "merged"
    with ContinualMerger(tiny_base, out, "task_arithmetic", on_step=evaluator, device="cpu") as merger:
        merger.add_all(tiny_experts[:3])
    assert loads == [str(out)]  # read once, at step 1; steps 2 and 3 were handed the merged tensors
    final = Evaluator(["synthetic/colors"], limit=24, device="cpu", workers=0).evaluate(str(out))
    assert evaluator.report.rows[-1] == [final["synthetic/colors"]["accuracy"]] * 3
    resident = evaluator._resident[0].state_dict()
    for name, tensor in load_clip(out, device="cpu")[0].state_dict().items():
        assert torch.equal(resident[name], tensor), name
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["eval_dtype"] == "float32" and "PIL" in saved["preprocessing"]
    assert saved["steps"][-1]["results"]["synthetic/colors"]["undecodable"] == 0


def test_card_states_preprocessing_dtype_and_undecodable_images(tiny_base, tiny_experts, tmp_path):
    from hf_merge.merging.engine import ContinualMerger
    from hf_merge.publish.card import write_card

    tasks = ["synthetic/colors"] * 2
    evaluator = ContinualEvaluator(tasks, evaluator=Evaluator(tasks, limit=16, device="cpu", workers=0, dtype="bfloat16"))
    out = tmp_path / "merged"
    with ContinualMerger(tiny_base, out, "average", on_step=evaluator, device="cpu") as merger:
        merger.add_all(tiny_experts[:2])
    card = write_card(out).read_text()
    assert "Images preprocessed with CLIPImageProcessor" in card and "(PIL, as the reference); forward pass in bfloat16." in card
    assert "could not be decoded" not in card
    results = json.loads((out / "eval_results.json").read_text())
    results["steps"][-1]["results"]["synthetic/colors"]["undecodable"] = 3
    (out / "eval_results.json").write_text(json.dumps(results))
    assert "synthetic/colors: 3 images could not be decoded (skipped)." in write_card(out).read_text()
