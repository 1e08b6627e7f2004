"""Fine-tunes that another user pushes while a watcher runs: compatible, incompatible, broken, harmful."""

from __future__ import annotations

import shutil
from pathlib import Path

from .tiny_clip import build_tiny_clip, make_expert


def write_card(folder: Path, base_repo: str, *, license: str | None = "mit", extra: str = "") -> None:
    """A README whose front matter names the base, as a fine-tune's card does (the Hub tags it)."""
    lines = ["---", f"base_model: {base_repo}", "library_name: transformers"]
    if license:
        lines.append(f"license: {license}")
    lines += [extra.rstrip("\n")] if extra else []
    lines += ["---", "", "A fine-tune of the tiny CLIP base.", ""]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")


def fine_tune(base_dir: Path, out_dir: Path, base_repo: str, *, seed: int, scale: float = 0.01,
              license: str | None = "mit", extra: str = "") -> Path:
    """A compatible fine-tune of ``base_dir`` with a card naming ``base_repo``."""
    shutil.rmtree(out_dir, ignore_errors=True)
    make_expert(base_dir, out_dir, seed=seed, scale=scale)
    (out_dir / "README.md").unlink(missing_ok=True)
    write_card(out_dir, base_repo, license=license, extra=extra)
    return out_dir


def other_architecture(out_dir: Path, base_repo: str) -> Path:
    """A CLIP of another width that claims the same base."""
    shutil.rmtree(out_dir, ignore_errors=True)
    build_tiny_clip(out_dir, seed=5, hidden_size=48)
    write_card(out_dir, base_repo)
    return out_dir


def pickle_only(base_dir: Path, out_dir: Path, base_repo: str) -> Path:
    """The fine-tune's weights as ``pytorch_model.bin`` only."""
    import torch
    from safetensors.torch import load_file

    fine_tune(base_dir, out_dir, base_repo, seed=77)
    torch.save(load_file(out_dir / "model.safetensors"), out_dir / "pytorch_model.bin")
    (out_dir / "model.safetensors").unlink()
    return out_dir


def with_nan(base_dir: Path, out_dir: Path, base_repo: str) -> Path:
    """A fine-tune one of whose merged tensors holds a NaN."""
    from safetensors.torch import load_file, save_file

    fine_tune(base_dir, out_dir, base_repo, seed=78)
    tensors = load_file(out_dir / "model.safetensors")
    name = next(n for n in sorted(tensors) if n.startswith("vision_model.encoder.") and n.endswith("q_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir
