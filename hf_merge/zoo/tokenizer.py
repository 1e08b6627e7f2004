"""The real CLIP BPE tokenizer, rebuilt offline from the merges file that ``clip-anytorch`` ships.

OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` holds the byte-pair merges; the vocabulary is derived
from it exactly as ``clip.simple_tokenizer.SimpleTokenizer`` does, so ``CLIPTokenizer`` built from
the two files written here produces the same ids as the original CLIP (49,408 tokens).
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import util as importlib_util
from pathlib import Path

from hf_merge.errors import HfMergeError

VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP map from each byte to a printable unicode character (the BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=False))


def bpe_merges_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``clip-anytorch`` package."""
    # find_spec locates the package without importing it (its __init__ pulls in torchvision and
    # pkg_resources, which are not needed to read one data file).
    spec = importlib_util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise HfMergeError("The CLIP BPE merges need the 'clip-anytorch' package: pip install 'hf-merge[zoo]'.")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise HfMergeError(f"{path} is missing from the installed 'clip-anytorch' package.")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Return CLIP's ``(vocab, merges)``: 49,408 tokens and 48,894 merge rules."""
    lines = gzip.open(bpe_merges_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise HfMergeError(f"Unexpected CLIP vocabulary size {len(vocab)} (expected {VOCAB_SIZE}).")
    return vocab, merges


def write_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs for ``CLIPTokenizer``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return out


@lru_cache(maxsize=2)
def load_clip_tokenizer(model_max_length: int = 77):
    """A ``CLIPTokenizer`` with the real vocabulary, built once into a cache folder."""
    from transformers import CLIPTokenizer

    from hf_merge.zoo.cache import cache_root

    folder = cache_root() / f"tokenizer-{model_max_length}"
    if not (folder / "merges.txt").is_file():
        write_clip_tokenizer(folder, model_max_length=model_max_length)
    return CLIPTokenizer.from_pretrained(folder)
