"""Small but real CLIP checkpoints, built offline in a second, for tests and the offline demo.

`build_tiny_clip` writes a randomly initialised :class:`~transformers.CLIPModel` and its
:class:`~transformers.CLIPProcessor` in the layout of a Hub repository (``config.json``,
``model.safetensors``, ``preprocessor_config.json``, tokenizer files), so that every code path that
later meets a real ``openai/clip-vit-base-patch32`` (``from_pretrained``, ``snapshot_download``,
merging tensors by name) runs unchanged on it.

The tokenizer is a byte-level BPE with the structure of OpenAI's: the 256 byte symbols, the same
256 with the end-of-word marker ``</w>``, a few merges, then ``<|startoftext|>`` and
``<|endoftext|>``. In CLIP the unknown token *is* the end-of-text token, so a vocabulary that missed
a character would silently cut a prompt at that character; with every byte present nothing is
ever unknown.

`make_expert` derives "fine-tuned" copies: deterministic task vectors (mostly low rank, plus a
little dense noise, as real fine-tuning deltas are) added to one tower, everything else byte for
byte identical.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

from hf_merge.io.merge_folder import RESULTS_FILENAME, STATE_FILENAME
from hf_merge.log import get_logger
from hf_merge.zoo.tokenizer import bytes_to_unicode

logger = get_logger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77  # CLIP's context length; the processor pads and truncates to it.

# Words that get whole-word tokens, so common prompts are short; anything else falls back to bytes.
_MERGE_WORDS = (
    "a photo of the an this is picture red green blue yellow black white orange purple "
    "square circle triangle ring star shape small large dog cat car bird digit number zero one "
    "two three four five six seven eight nine"
).split()

# Bump when the generated weights change, so that cached zoos are rebuilt.
_ZOO_FORMAT = 1

_SCOPES = {
    "vision": ("vision_model.", "visual_projection."),
    "text": ("text_model.", "text_projection."),
    "all": ("vision_model.", "visual_projection.", "text_model.", "text_projection."),
}


def tiny_bpe(words: tuple[str, ...] | list[str] = _MERGE_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of the tiny byte-level BPE, in OpenAI's order.

    Order: 256 byte symbols, the same with ``</w>``, one token per merge, then the two special
    tokens, so ids follow the same rules as the 49,408-token original (end-of-text has the
    highest id). Each word of ``words`` gets a chain of merges that ends in a whole-word token.
    """
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + END_OF_WORD for symbol in symbols]
    byte_encoder = bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        pieces = [byte_encoder[b] for b in word.encode("utf-8")]
        pieces[-1] += END_OF_WORD
        merged = pieces[0]
        for piece in pieces[1:]:
            pair = (merged, piece)
            merged += piece
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:  # a merge may rebuild a token that exists already ("a" + "</w>")
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tokenizer():
    """The tiny CLIP tokenizer (``transformers.CLIPTokenizer``), built in memory."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_bpe()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)


def tiny_clip_config(
    *,
    vocab_size: int,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 16,
    bos_token_id: int,
    eos_token_id: int,
):
    """A ``CLIPConfig`` with both towers of the given width and depth."""
    from transformers import CLIPConfig

    tower = {
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "projection_dim": projection_dim,
    }
    text_config = dict(
        tower,
        vocab_size=vocab_size,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    vision_config = dict(tower, image_size=image_size, patch_size=patch_size, num_channels=3)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)


def _generator(seed: int, name: str) -> torch.Generator:
    # Seeded per tensor name: values do not depend on the order in which tensors are visited,
    # nor on the global RNG (which this module never touches).
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _init_weights(model, seed: int) -> None:
    """Fill every parameter from a per-name seeded generator (independent of transformers' init)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            generator = _generator(seed, name)
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name == "logit_scale":
                param.fill_(math.log(1 / 0.07))
            elif param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.02 * noise)
            elif param.ndim == 1:
                param.copy_(0.02 * noise)  # biases, class embedding
            elif "embedding" in name and "patch" not in name:
                param.copy_(0.02 * noise)
            else:
                fan_in = math.prod(param.shape[1:])
                param.copy_(noise / math.sqrt(fan_in))


def create_tiny_clip(
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 16,
):
    """``(CLIPModel, CLIPProcessor)`` of the tiny model, in memory (what `build_tiny_clip` saves)."""
    from transformers import CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab, _ = tiny_bpe()
    config = tiny_clip_config(
        vocab_size=len(vocab),
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        projection_dim=projection_dim,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
    )
    with torch.random.fork_rng(devices=[]):  # the constructor's own init draws from the global RNG
        model = CLIPModel(config)
    _init_weights(model, seed)
    model.eval()
    # The PIL image processor needs no torchvision; its saved config is the standard CLIPImageProcessor's.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer())


def build_tiny_clip(out_dir: str | Path, *, seed: int = 0, **shape) -> Path:
    """Write a small, randomly initialised CLIP model + processor to ``out_dir``; return the path.

    ``shape`` takes the keyword arguments of `create_tiny_clip` (``image_size=32``,
    ``patch_size=8``, ``hidden_size=32``, ``num_layers=2``, ``num_heads=2``,
    ``projection_dim=16``). The folder has the files of a Hub CLIP repository: ``config.json``,
    ``model.safetensors``, ``preprocessor_config.json``, ``tokenizer.json``,
    ``tokenizer_config.json``, ``vocab.json`` and ``merges.txt``. Same arguments, same bytes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = create_tiny_clip(seed=seed, **shape)
    model.save_pretrained(out_dir)
    # Separate files (not one processor_config.json): the layout of the original CLIP repositories.
    processor.image_processor.save_pretrained(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    # The slow-tokenizer files of the original repositories, for other loaders (open_clip, older transformers).
    vocab, merges = tiny_bpe()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    logger.debug("built tiny CLIP (seed=%d) in %s", seed, out_dir)
    return out_dir


def _in_scope(name: str, scope: str) -> bool:
    try:
        prefixes = _SCOPES[scope]
    except KeyError:
        raise ValueError(f"scope must be one of {sorted(_SCOPES)}, got {scope!r}") from None
    return name.startswith(prefixes)


def task_vector(name: str, weight: torch.Tensor, *, seed: int, scale: float, rank: int = 2) -> torch.Tensor:
    """The deterministic delta ``make_expert`` adds to one tensor.

    Matrices (conv kernels flattened to ``out x rest``) get 90 % of the delta's energy in a
    random rank-``rank`` component and 10 % as dense noise, the shape of real fine-tuning updates
    that SVD-based merges (OPCM, TSV) exploit. Vectors get dense noise. The delta's Frobenius norm
    is ``scale`` times the weight's (or ``scale * 0.02 * sqrt(numel)`` for an all-zero weight).
    """
    generator = _generator(seed, "task-vector/" + name)
    weight = weight.float()
    dense = torch.randn(weight.shape, generator=generator)
    if weight.ndim >= 2:
        rows = weight.shape[0]
        cols = weight.numel() // rows
        r = min(rank, rows, cols)
        u = torch.randn(rows, r, generator=generator)
        v = torch.randn(cols, r, generator=generator)
        low_rank = (u @ v.T).reshape(weight.shape)
        delta = 0.9 * low_rank / low_rank.norm() + 0.1 * dense / dense.norm()
    else:
        delta = dense
    target = weight.norm() if weight.norm() > 0 else 0.02 * math.sqrt(weight.numel())
    return delta * (scale * target / delta.norm())


def make_expert(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int,
    scale: float = 0.01,
    scope: str = "vision",
) -> Path:
    """Copy the model in ``base_dir`` to ``out_dir`` with a task vector added to one tower.

    ``scope`` is ``"vision"`` (``vision_model.*`` and ``visual_projection.*``, what the paper
    fine-tunes), ``"text"`` or ``"all"``. ``logit_scale`` and every tensor outside the scope stay
    bit-identical; every other file of the folder is copied unchanged.
    """
    from safetensors.torch import load_file, save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _in_scope("", scope)  # validate early
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in base_dir.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            shutil.copy2(path, out_dir / path.name)
    tensors = load_file(base_dir / "model.safetensors")
    for name, weight in tensors.items():
        if _in_scope(name, scope) and weight.is_floating_point():
            delta = task_vector(name, weight, seed=seed, scale=scale)
            tensors[name] = (weight.float() + delta).to(weight.dtype)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    logger.debug("built tiny expert (seed=%d, scope=%s) in %s", seed, scope, out_dir)
    return out_dir


def expert_seed(seed: int, index: int) -> int:
    """Seed of expert ``index`` (0-based) in the zoo built with ``seed``."""
    return 1000 * (seed + 1) + index


def build_tiny_zoo(root: str | Path, n_experts: int, seed: int = 0, **base_kwargs) -> tuple[Path, list[Path]]:
    """A base model and ``n_experts`` experts under ``root``, built once and reused.

    The folder name holds every argument, so a second call with the same arguments returns the
    cached models; a zoo is built in a temporary folder and renamed, so a crash never leaves a
    half-built zoo that looks finished.
    """
    root = Path(root)
    key = "-".join(f"{k}{v}" for k, v in sorted(base_kwargs.items()))
    zoo_dir = root / f"tiny-clip-v{_ZOO_FORMAT}-seed{seed}-n{n_experts}{'-' + key if key else ''}"
    base_dir = zoo_dir / "base"
    expert_dirs = [zoo_dir / f"expert-{i}" for i in range(n_experts)]
    if not zoo_dir.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
        try:
            build_tiny_clip(staging / "base", seed=seed, **base_kwargs)
            for i in range(n_experts):
                make_expert(staging / "base", staging / f"expert-{i}", seed=expert_seed(seed, i))
            try:
                staging.rename(zoo_dir)
            except OSError:  # another process finished the same zoo first
                if not zoo_dir.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return base_dir, expert_dirs


def write_merge_result(
    out_dir: str | Path,
    base_dir: str | Path,
    expert_dirs: list[Path],
    *,
    base: dict,
    experts: list[dict],
    tasks: list[str] | None = None,
    method: str = "average",
) -> Path:
    """A merge output folder (weights = the experts' average) with state, evaluation and plot.

    Used where a test needs what a merge publishes (``merge_state.json`` with lineage,
    ``eval_results.json``, ``accuracy.png``) and not the merge itself. ``base``/``experts`` are
    provenance dicts (``name``, ``repo_id``, ``commit_sha``); the accuracies are made up but
    deterministic, and labelled as such by the file's ``metric``.
    """
    from PIL import Image, ImageDraw
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(base_dir).iterdir():
        if path.is_file() and path.name not in ("model.safetensors", "README.md"):
            shutil.copy2(path, out_dir / path.name)
    tensors = [load_file(Path(d) / "model.safetensors") for d in expert_dirs]
    merged = {name: sum((t[name] for t in tensors), torch.zeros_like(tensors[0][name])) / len(tensors) for name in tensors[0]}
    save_file(merged, out_dir / "model.safetensors", metadata={"format": "pt"})
    lineage = [dict(entry, step=i + 1, revision=None) for i, entry in enumerate(experts)]
    state = {
        "method": method,
        "hyperparameters": {},
        "scope": "vision",
        "step": len(experts),
        "base": dict(base, revision=None),
        "lineage": lineage,
        "method_state": {},
        "state_tensors": None,
        "format_version": 1,
    }
    (out_dir / STATE_FILENAME).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    if tasks:
        n = len(tasks)
        matrix = [[round(0.9 - 0.05 * t + 0.01 * i, 4) if i <= t else None for i in range(n)] for t in range(n)]
        report = {
            "schema_version": 1,
            "metric": "zero-shot top-1 accuracy (synthetic values for tests)",
            "limit": 8,
            "tasks": list(tasks),
            "experts": [e.get("repo_id") or e.get("name") for e in experts],
            "accuracy_matrix": matrix,
            "average_accuracy_per_step": [sum(v for v in row if v is not None) / (t + 1) for t, row in enumerate(matrix)],
            "steps": [
                {"step": t + 1, "results": {tasks[i]: {"accuracy": matrix[t][i]} for i in range(t + 1)}} for t in range(n)
            ],
        }
        (out_dir / RESULTS_FILENAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        plot = Image.new("RGB", (64, 48), "white")
        ImageDraw.Draw(plot).line([(4, 40), (30, 20), (60, 10)], fill="black", width=2)
        plot.save(out_dir / "accuracy.png")
    return out_dir
