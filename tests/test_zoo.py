"""The offline zoo: real tokenizer ids, task loaders and splits, a deterministic cached builder, push."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_merge.zoo import TASKS, ZooConfig, build_zoo, load_task, push_zoo, register_offline_tasks
from hf_merge.zoo.tokenizer import load_clip_tokenizer


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return build_zoo(tmp_path_factory.mktemp("zoo-a"), ZooConfig.tiny())


def test_tokenizer_matches_openai_clip_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MERGE_CACHE", str(tmp_path))
    tok = load_clip_tokenizer.__wrapped__(77)
    assert tok("a photo of a red square")["input_ids"] == [49406, 320, 1125, 539, 320, 736, 3999, 49407]
    assert len(tok) == 49408
    # Characters outside the training corpus map to byte symbols, never to the end-of-text token.
    ids = tok("🐻 ankle boot")["input_ids"]
    assert ids.count(49407) == 1 and ids[-1] == 49407


@pytest.mark.parametrize("name", list(TASKS))
def test_task_loader_shapes_classes_and_disjoint_splits(name):
    info = TASKS[name]
    digests = {}
    for split in ("train", "val", "test"):
        x, y = load_task(name, split)
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (32, 32, 3)
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert set(np.unique(y).tolist()) == set(range(len(info.classnames)))
        if info.sizes != (0, 0, 0):
            assert len(x) == info.sizes[("train", "val", "test").index(split)]
        digests[split] = {hashlib.sha1(img.tobytes()).hexdigest() for img in x}
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    # Deterministic: a second call gives the same images.
    again, _ = load_task(name, "val", limit=5)
    assert np.array_equal(again, load_task(name, "val")[0][:5])


def test_tiny_zoo_is_cached_and_loadable(tiny_zoo):
    from transformers import CLIPModel

    manifest = json.loads((tiny_zoo.root / "zoo.json").read_text())
    assert manifest["tasks"] == ["digits8x8", "faces"]
    assert set(tiny_zoo.experts) == {"digits8x8", "faces"}
    # Reused, not rebuilt: same folder, manifest untouched.
    mtime = (tiny_zoo.root / "zoo.json").stat().st_mtime_ns
    again = build_zoo(tiny_zoo.root.parent, ZooConfig.tiny())
    assert again.root == tiny_zoo.root and (again.root / "zoo.json").stat().st_mtime_ns == mtime
    base = load_file(tiny_zoo.base / "model.safetensors")
    expert = load_file(tiny_zoo.experts["digits8x8"] / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], expert[k])}
    assert changed and all(k.startswith("vision_model.") for k in changed)
    model = CLIPModel.from_pretrained(tiny_zoo.experts["faces"])
    assert model.config.text_config.vocab_size == 49408
    card = (tiny_zoo.experts["faces"] / "README.md").read_text()
    assert "base_model: zoo-clip-base" in card and "faces" in card


@pytest.mark.slow
def test_tiny_zoo_rebuilds_bit_identically(tiny_zoo, tmp_path):
    other = build_zoo(tmp_path, ZooConfig.tiny())
    assert other.metrics == tiny_zoo.metrics
    for a, b in [(tiny_zoo.base, other.base), (tiny_zoo.experts["faces"], other.experts["faces"])]:
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_offline_tasks_evaluate_like_the_builder(tiny_zoo):
    from hf_merge.evaluation import evaluate_model, get_task

    names = register_offline_tasks()
    assert "offline/mnist" in names and "offline/faces/val" in names
    task = get_task("offline/faces")
    assert task.classes == TASKS["faces"].classnames and task.dataset.kind == "python"
    result = evaluate_model(str(tiny_zoo.base), ["offline/faces", "offline/faces/val"])
    assert result["offline/faces"]["accuracy"] == pytest.approx(tiny_zoo.metrics["faces"]["zero_shot_test"])
    assert result["offline/faces/val"]["accuracy"] == pytest.approx(tiny_zoo.metrics["faces"]["zero_shot_val"])


def test_push_zoo_to_local_hub(tiny_zoo, hub_url, alice_token, hub_api):
    names = push_zoo(hub_url, alice_token, "alice", paths=tiny_zoo)
    assert names == {"base": "alice/zoo-clip-base", "digits8x8": "alice/zoo-clip-digits8x8",
                     "faces": "alice/zoo-clip-faces"}
    files = set(hub_api.list_repo_files("alice/zoo-clip-faces"))
    assert {"model.safetensors", "config.json", "vocab.json", "merges.txt", "README.md"} <= files
    card = open(hub_api.hf_hub_download("alice/zoo-clip-faces", "README.md")).read()
    assert "base_model: alice/zoo-clip-base" in card
