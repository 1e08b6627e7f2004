"""Fine-tunes that another user pushes while a watcher runs: compatible, incompatible, broken, harmful."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from hf_merge.testing.tiny_clip import build_tiny_clip, make_expert


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


def prediction_task(model_dir: Path, name: str, out_dir: Path, *, per_class: int = 4):
    """A registered task whose labels are what ``model_dir`` predicts on coloured squares.

    A random tiny CLIP is at chance on any real task, so forgetting cannot be seen there; on this
    task the model it was built from scores 100 %, and a merge that changes its predictions loses.
    """
    import torch
    from PIL import Image

    from hf_merge.evaluation import Task, register_task
    from hf_merge.evaluation.heads import build_head
    from hf_merge.evaluation.runner import load_clip
    from hf_merge.evaluation.synthetic import COLOR_NAMES
    from hf_merge.evaluation.tasks import DatasetSpec

    templates = ("a photo of a {} square.",)
    probe = Task(name, COLOR_NAMES, templates)
    model, processor = load_clip(str(model_dir), device="cpu")
    head = build_head(model, processor.tokenizer, probe)
    shutil.rmtree(out_dir, ignore_errors=True)
    generator = torch.Generator().manual_seed(7)
    images = [Image.new("RGB", (32, 32), tuple(int(v) for v in torch.randint(0, 256, (3,), generator=generator)))
              for _ in range(per_class * len(COLOR_NAMES))]
    with torch.no_grad():
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        predicted = head.logits(model.get_image_features(pixel_values=pixels).pooler_output).argmax(-1).tolist()
    for index, (image, label) in enumerate(zip(images, predicted, strict=False)):
        folder = out_dir / COLOR_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:03d}.png")
    task = Task(name, COLOR_NAMES, templates, DatasetSpec(kind="imagefolder", path=str(out_dir)))
    return register_task(task, overwrite=True)


def publish(api, repo_id: str, folder: Path, message: str = "Add model") -> str:
    """Create ``repo_id`` if needed and upload ``folder``; the head commit afterwards."""
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    return api.model_info(repo_id).sha


def publish_parents(api, prefix: str, base_dir: Path, expert_dirs: list[Path]) -> tuple[str, list[str]]:
    """``(base repo id, expert repo ids)``: ``alice/<prefix>-base`` and ``alice/<prefix>-expert-<i>``
    published from the folders; a base of its own, so only its test's fine-tunes claim it."""
    base = f"alice/{prefix}-base"
    publish(api, base, base_dir)
    experts = [f"alice/{prefix}-expert-{index}" for index in range(len(expert_dirs))]
    for repo, folder in zip(experts, expert_dirs, strict=True):
        publish(api, repo, folder)
    return base, experts


def merged_repo(api, token: str, prefix: str, base_dir: Path, expert_dirs: list[Path], work: Path,
                tasks: list[str] | None = None, eval_limit: int | None = 8) -> tuple[str, str]:
    """``(merged repo id, base repo id)``: a base and experts of its own, merged and pushed by hf-merge.

    Each test module uses its own base, so the fine-tunes it pushes are found by its watcher only.
    """
    from hf_merge.api import merge
    from hf_merge.recipe import EvalSpec

    namespace = api.whoami()["name"]
    base = f"{namespace}/{prefix}-base"
    publish(api, base, base_dir)
    experts = []
    for index, folder in enumerate(expert_dirs):
        experts.append(f"{namespace}/{prefix}-expert-{index}")
        publish(api, experts[-1], folder)
    repo = f"{namespace}/{prefix}-merged"
    spec = EvalSpec(tasks=list(tasks), every_step=True, limit=eval_limit) if tasks else None
    merge(base=base, experts=experts, method="opcm", parameters={"alpha": 0.5}, eval=spec,
          output=str(work / repo.split("/")[-1]), push_to_hub=repo, token=token)
    return repo, base


def lineage_of(repo_id: str) -> list[tuple[str, str]]:
    """``(repo_id, commit_sha)`` of every merged expert, from the repo's ``merge_state.json`` on ``main``."""
    import json

    from huggingface_hub import hf_hub_download

    from hf_merge.io.merge_folder import STATE_FILENAME

    state = json.loads(Path(hf_hub_download(repo_id, STATE_FILENAME, force_download=True)).read_text())
    return [(entry.get("repo_id"), entry.get("commit_sha")) for entry in state["lineage"]]


def wait_until(condition, timeout: float = 180.0) -> bool:
    """Poll ``condition`` every 0.3 s until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.3)
    return False
