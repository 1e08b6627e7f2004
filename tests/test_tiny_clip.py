"""The tiny CLIP factory: real, loadable, deterministic models; a tokenizer without unknowns; experts."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
import regex
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, AutoTokenizer, CLIPModel, CLIPProcessor

from hf_merge.testing.tiny_clip import (
    BOS_TOKEN,
    END_OF_WORD,
    EOS_TOKEN,
    build_tiny_clip,
    build_tiny_zoo,
    bytes_to_unicode,
    create_tiny_clip,
    make_expert,
)

HUB_FILES = {
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
}
UNICODE_TEXTS = [
    "a photo of a red square.",
    "Ünïcödé ÇA VA? naïve café, straße",
    "日本語のテキスト 中文 한국어",
    "emoji 😀🐈‍⬛ 👍🏽 flags 🇫🇷",
    "ελληνικά кириллица עברית العربية हिन्दी",
    "tabs\tand\nnewlines   and  spaces; it's 42% of $3.50 — ok…",
    "control \x01\x7f and math ∑∫√ and zero-width \u200b here",
]


def _images(n: int, size: int = 40) -> list[Image.Image]:
    return [Image.fromarray((np.random.RandomState(i).rand(size, size, 3) * 255).astype("uint8")) for i in range(n)]


def _logits(model, processor, texts=("a photo of a cat.", "a photo of a dog.", "a blue ring")):
    inputs = processor(text=list(texts), images=_images(3), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits_per_image


class _ReferenceBPE:
    """OpenAI's pure-Python CLIP BPE (``simple_tokenizer``), reading the saved vocab.json/merges.txt."""

    PATTERN = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )

    def __init__(self, folder):
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines) if line}
        self.byte_encoder = bytes_to_unicode()

    def _bpe(self, token: str) -> list[str]:
        word = tuple(token[:-1]) + (token[-1] + END_OF_WORD,)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            bigram = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if bigram not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return list(word)

    def encode(self, text: str) -> list[int]:
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
        ids = [self.encoder[BOS_TOKEN]]
        for piece in self.PATTERN.findall(text):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self._bpe(symbols)]
        return ids + [self.encoder[EOS_TOKEN]]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny") / "base", seed=0)


def test_hub_layout_and_auto_classes(built):
    assert HUB_FILES <= {p.name for p in built.iterdir()}
    config = json.loads((built / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"]
    assert config["vision_config"]["image_size"] == 32 and config["vision_config"]["patch_size"] == 8
    assert config["projection_dim"] == 16
    processor = AutoProcessor.from_pretrained(built)
    assert isinstance(processor, CLIPProcessor)
    assert processor.tokenizer.model_max_length == 77
    pixels = processor(images=_images(1, size=50), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, built):
    again = build_tiny_clip(tmp_path / "again", seed=0)
    other = build_tiny_clip(tmp_path / "other", seed=1)
    assert (again / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    a, b = load_file(built / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert not torch.equal(a["vision_model.encoder.layers.0.mlp.fc1.weight"], b["vision_model.encoder.layers.0.mlp.fc1.weight"])
    assert torch.equal(a["logit_scale"], b["logit_scale"])


def test_build_does_not_touch_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_clip(tmp_path / "m", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_from_pretrained_gives_the_in_memory_logits(built):
    model, processor = create_tiny_clip(seed=0)
    expected = _logits(model, processor)
    loaded = CLIPModel.from_pretrained(built).eval()
    actual = _logits(loaded, CLIPProcessor.from_pretrained(built))
    assert torch.equal(actual, expected)
    # A real model, not a constant: different images and prompts get different scores.
    assert expected.std() > 0.1


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_any_unicode_text_has_no_unknown_and_round_trips(built, text):
    tokenizer = AutoTokenizer.from_pretrained(built)
    ids = tokenizer(text)["input_ids"]
    eos, bos = tokenizer.convert_tokens_to_ids([EOS_TOKEN, BOS_TOKEN])
    # The unknown token is end-of-text: exactly one, at the end, means nothing was unknown or cut.
    assert ids[0] == bos and ids[-1] == eos
    assert eos not in ids[1:-1] and bos not in ids[1:-1]
    byte_decoder = {v: k for k, v in bytes_to_unicode().items()}
    tokens = tokenizer.convert_ids_to_tokens(ids[1:-1])
    restored = bytes(byte_decoder[c] for t in tokens for c in t.replace(END_OF_WORD, "")).decode("utf-8")
    normalized = regex.sub(r"\s+", "", unicodedata.normalize("NFC", text).lower())
    assert restored == normalized


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_fast_tokenizer_matches_reference_bpe(built, text):
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert tokenizer(text)["input_ids"] == _ReferenceBPE(built).encode(text)


def test_known_words_are_single_tokens(built):
    tokenizer = AutoTokenizer.from_pretrained(built)
    tokens = tokenizer.tokenize("a photo of a red square.")
    assert tokens == ["a</w>", "photo</w>", "of</w>", "a</w>", "red</w>", "square</w>", ".</w>"]


def test_long_prompt_is_truncated_to_the_context(built):
    processor = CLIPProcessor.from_pretrained(built)
    batch = processor(text=["word " * 200], return_tensors="pt", padding="max_length", truncation=True)
    assert batch["input_ids"].shape == (1, 77)


def test_expert_changes_only_the_vision_tower(tmp_path, built):
    expert = make_expert(built, tmp_path / "expert", seed=7, scale=0.05)
    for name in HUB_FILES - {"model.safetensors"}:
        assert (expert / name).read_bytes() == (built / name).read_bytes(), name
    base, tuned = load_file(built / "model.safetensors"), load_file(expert / "model.safetensors")
    assert base.keys() == tuned.keys()
    for name in base:
        in_scope = name.startswith(("vision_model.", "visual_projection."))
        if not in_scope:
            assert torch.equal(base[name], tuned[name]), name
            continue
        delta = tuned[name] - base[name]
        relative = (delta.norm() / base[name].norm()).item()
        assert relative == pytest.approx(0.05, rel=1e-3), name
        if delta.ndim == 2 and min(delta.shape) > 4:
            # Mostly low rank, as fine-tuning updates are: the top 2 singular values hold the energy.
            singular = torch.linalg.svdvals(delta)
            assert (singular[:2].square().sum() / singular.square().sum()).item() > 0.75, name
    loaded = CLIPModel.from_pretrained(expert)
    assert loaded.config.vision_config.hidden_size == 32


def test_experts_are_deterministic_and_distinct(tmp_path, built):
    one = load_file(make_expert(built, tmp_path / "a", seed=1) / "model.safetensors")
    same = load_file(make_expert(built, tmp_path / "b", seed=1) / "model.safetensors")
    two = load_file(make_expert(built, tmp_path / "c", seed=2) / "model.safetensors")
    base = load_file(built / "model.safetensors")
    name = "visual_projection.weight"
    assert torch.equal(one[name], same[name])
    d1, d2 = (one[name] - base[name]).flatten(), (two[name] - base[name]).flatten()
    assert d1.norm() > 0 and d2.norm() > 0
    assert abs(torch.nn.functional.cosine_similarity(d1, d2, dim=0).item()) < 0.9


def test_text_scope_and_bad_scope(tmp_path, built):
    expert = make_expert(built, tmp_path / "text", seed=3, scope="text")
    base, tuned = load_file(built / "model.safetensors"), load_file(expert / "model.safetensors")
    changed = {n for n in base if not torch.equal(base[n], tuned[n])}
    assert changed and all(n.startswith(("text_model.", "text_projection.")) for n in changed)
    with pytest.raises(ValueError, match="scope"):
        make_expert(built, tmp_path / "bad", seed=3, scope="audio")


def test_zoo_is_cached(tmp_path):
    base, experts = build_tiny_zoo(tmp_path, 2, seed=0)
    assert len(experts) == 2 and all((p / "model.safetensors").is_file() for p in [base, *experts])
    stamp = (experts[1] / "model.safetensors").stat().st_mtime_ns
    again = build_tiny_zoo(tmp_path, 2, seed=0)
    assert again == (base, experts)
    assert (experts[1] / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".building-")]


def test_push_to_hub_and_back_gives_identical_logits(hub_server, alice_token):
    model, processor = create_tiny_clip(seed=3)
    repo_id = "alice/tiny-clip-roundtrip"
    model.push_to_hub(repo_id, token=alice_token)
    processor.push_to_hub(repo_id, token=alice_token)
    loaded = CLIPModel.from_pretrained(repo_id).eval()
    loaded_processor = CLIPProcessor.from_pretrained(repo_id)
    assert torch.equal(_logits(loaded, loaded_processor), _logits(model, processor))


def test_seeded_hub_serves_the_zoo(seeded_hub, hub_api):
    from huggingface_hub import snapshot_download

    assert seeded_hub.base == "alice/tiny-clip-base"
    assert seeded_hub.experts == [f"alice/tiny-clip-expert-{i}" for i in range(6)]
    files = set(hub_api.list_repo_files(seeded_hub.experts[5]))
    assert HUB_FILES <= files
    folder = snapshot_download(seeded_hub.experts[2], revision=seeded_hub.commits[seeded_hub.experts[2]])
    local = seeded_hub.expert_dirs[2]
    assert (local / "model.safetensors").read_bytes() == open(f"{folder}/model.safetensors", "rb").read()
