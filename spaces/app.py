"""Try a merged CLIP model: zero-shot image classification, side by side with its base and experts.

This file is the whole Space. It runs on the Hugging Face Hub as is (``requirements.txt`` beside
it), and locally with ``hf-merge space run REPO``. It needs nothing from hf-merge: everything it
shows besides the models themselves (the base and the experts with their pinned commits, the
evaluated tasks' class lists, the accuracy after each merge step) is in ``space_config.json``,
written when the Space was published.

Which model to load, first match wins:
  1. the ``HF_MERGE_MODEL`` environment variable (a repo id or a local folder),
  2. ``model`` in ``space_config.json`` (path in ``HF_MERGE_SPACE_CONFIG``, else beside this file).
A private model needs an ``HF_TOKEN`` secret in the Space settings.

Models are loaded from safetensors only and never with remote code.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image, UnidentifiedImageError

APP_DIR = Path(__file__).resolve().parent
CONFIG_NAME = "space_config.json"
TEMPLATE = "a photo of a {}."
FREE_TEXT = "Free text"
NO_COMPARISON = "none"

# Input limits: a public Space must not be made to decode a 100-megapixel image or embed
# thousands of prompts for one request.
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_LABELS = 50
MAX_LABEL_CHARS = 100
MAX_TOP_K = 10
# Loaded models kept in memory (merged + one comparison + one spare); each ViT-B/32 is ~600 MB.
MAX_LOADED_MODELS = 3


# ----------------------------------------------------------------------------------- config
def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The Space's configuration: ``space_config.json`` with ``HF_MERGE_MODEL`` applied on top."""
    path = Path(path or os.environ.get("HF_MERGE_SPACE_CONFIG") or APP_DIR / CONFIG_NAME)
    config: dict[str, Any] = {}
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        config["_dir"] = str(path.resolve().parent)
    if os.environ.get("HF_MERGE_MODEL"):
        config["model"] = os.environ["HF_MERGE_MODEL"]
        config.setdefault("revision", None)
    if not config.get("model"):
        raise RuntimeError(f"No model to serve: set HF_MERGE_MODEL or write {CONFIG_NAME} beside app.py")
    return config


def comparison_choices(config: dict[str, Any]) -> list[tuple[str, str]]:
    """``(display name, key)`` of every model the merged one can be compared with."""
    choices = []
    base = config.get("base") or {}
    if base.get("repo_id") or base.get("path"):
        choices.append((f"Base: {base.get('name') or base.get('repo_id')}", "base"))
    for index, expert in enumerate(config.get("experts") or []):
        if expert.get("repo_id") or expert.get("path"):
            step = expert.get("step", index + 1)
            choices.append((f"Expert {step}: {expert.get('name') or expert.get('repo_id')}", f"expert:{index}"))
    return choices + [("No comparison", NO_COMPARISON)]


def _source(config: dict[str, Any], key: str) -> tuple[str, str | None] | None:
    """``(repo id or folder, revision)`` of a comparison key, pinned to the merged commit."""
    if key == "base":
        entry = config.get("base") or {}
    elif key.startswith("expert:"):
        experts = config.get("experts") or []
        index = int(key.split(":", 1)[1])
        if not 0 <= index < len(experts):
            return None
        entry = experts[index]
    else:
        return None
    if entry.get("repo_id"):
        return entry["repo_id"], entry.get("commit_sha") or entry.get("revision")
    if entry.get("path") and Path(entry["path"]).is_dir():
        return entry["path"], None
    return None


# ----------------------------------------------------------------------------------- models
class ZeroShotModel:
    """A CLIP model and its processor; zero-shot classification by the CLIP protocol."""

    def __init__(self, reference: str, revision: str | None = None):
        from transformers import CLIPModel, CLIPProcessor

        token = os.environ.get("HF_TOKEN") or None
        self.reference = reference
        # use_safetensors: refuse pickled weights; remote code is never enabled.
        self.model = CLIPModel.from_pretrained(reference, use_safetensors=True, revision=revision or "main", token=token).eval()
        self.processor = CLIPProcessor.from_pretrained(reference, revision=revision or "main", token=token)
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @torch.no_grad()
    def text_embeddings(self, labels: tuple[str, ...]) -> torch.Tensor:
        """Normalised embeddings of ``"a photo of a {label}."``, cached per label list."""
        with self._lock:
            if labels in self._text_cache:
                self._text_cache.move_to_end(labels)
                return self._text_cache[labels]
        prompts = [TEMPLATE.format(label) for label in labels]
        inputs = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
        embeddings = _pooled(self.model.get_text_features(**inputs))
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        with self._lock:
            self._text_cache[labels] = embeddings
            while len(self._text_cache) > 16:
                self._text_cache.popitem(last=False)
        return embeddings

    @torch.no_grad()
    def classify(self, image: Image.Image, labels: tuple[str, ...]) -> dict[str, float]:
        """Probability of each label: softmax over ``exp(logit_scale) * cosine(image, prompt)``."""
        inputs = self.processor(images=image, return_tensors="pt")
        image_embedding = _pooled(self.model.get_image_features(**inputs))
        image_embedding = image_embedding / image_embedding.norm(dim=-1, keepdim=True)
        logits = self.model.logit_scale.exp() * image_embedding @ self.text_embeddings(labels).T
        probabilities = logits.softmax(dim=-1)[0]
        return {label: float(p) for label, p in zip(labels, probabilities)}


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding;
    # older versions return the tensor itself.
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ModelBank:
    """Models loaded on first use, the least recently used dropped beyond ``MAX_LOADED_MODELS``."""

    def __init__(self, capacity: int = MAX_LOADED_MODELS):
        self.capacity = capacity
        self._models: OrderedDict[tuple[str, str | None], ZeroShotModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, reference: str, revision: str | None = None) -> ZeroShotModel:
        key = (reference, revision)
        with self._lock:
            if key not in self._models:
                self._models[key] = ZeroShotModel(reference, revision)
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]


# ----------------------------------------------------------------------------------- inputs
def parse_labels(text: str | None) -> tuple[str, ...]:
    """Comma- or line-separated labels, stripped and de-duplicated; limits enforced with gr.Error."""
    labels: list[str] = []
    for part in (text or "").replace("\n", ",").split(","):
        label = " ".join(part.split())
        if label and label not in labels:
            labels.append(label)
    if len(labels) < 2:
        raise gr.Error("Enter at least two candidate labels, separated by commas.")
    if len(labels) > MAX_LABELS:
        raise gr.Error(f"Too many labels: {len(labels)} (at most {MAX_LABELS}).")
    too_long = [label for label in labels if len(label) > MAX_LABEL_CHARS]
    if too_long:
        raise gr.Error(f"Labels must be at most {MAX_LABEL_CHARS} characters; '{too_long[0][:30]}…' is longer.")
    return tuple(labels)


def open_image(path: str | None) -> Image.Image:
    """Open an uploaded image, refusing files and images over the size limits before decoding."""
    if not path:
        raise gr.Error("Upload an image first (or pick an example).")
    size = os.path.getsize(path)
    if size > MAX_IMAGE_BYTES:
        raise gr.Error(f"Image file too large: {size / 2**20:.1f} MB (at most {MAX_IMAGE_BYTES // 2**20} MB).")
    try:
        image = Image.open(path)  # reads the header only
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
        raise gr.Error("This file is not an image this Space can read (PNG, JPEG, WebP, GIF, BMP).") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise gr.Error(f"Image too large: {width}×{height} pixels (at most {MAX_IMAGE_PIXELS // 10**6} megapixels).")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------- app
_MARKUP = re.compile(r"([\\`*\[\]|<>&])")
_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def markdown_text(value: Any) -> str:
    """``value`` as literal Markdown text on one line: names and task labels come from other
    people's repos, so tags, links, code and table pipes in them are escaped. (A copy of
    ``hf_merge.publish.escape.markdown_text``: this file runs without hf-merge.)"""
    text = "".join(char if char.isprintable() else " " for char in str(value))
    return _MARKUP.sub(lambda m: _ENTITIES.get(m.group(1), "\\" + m.group(1)), text)


def accuracy_markdown(config: dict[str, Any]) -> str:
    """The per-step accuracy table of the model card, as Markdown."""
    accuracy = config.get("accuracy")
    if not accuracy or not accuracy.get("rows"):
        return "This merge was published without evaluation results."
    tasks = accuracy["tasks"]
    lines = ["| step | " + " | ".join(markdown_text(t) for t in tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
    for row in accuracy["rows"]:
        cells = ["–" if v is None else f"{100 * v:.1f}" for v in row["accuracy"]]
        lines.append(f"| {markdown_text(row['step'])} | " + " | ".join(cells) + f" | **{100 * row['average']:.1f}** |")
    return "Zero-shot accuracy (%) after each merge step, on the tasks merged so far.\n\n" + "\n".join(lines)


def lineage_markdown(config: dict[str, Any]) -> str:
    """Base and experts in merge order, with their pinned commits."""
    base = config.get("base") or {}
    lines = ["| step | model | commit |", "|---|---|---|"]
    name = base.get("name") or base.get("repo_id") or "?"
    lines.append(f"| 0 (base) | {markdown_text(name)} | {markdown_text((base.get('commit_sha') or '')[:10])} |")
    for index, expert in enumerate(config.get("experts") or []):
        name = expert.get("name") or expert.get("repo_id") or "?"
        step, sha = expert.get("step", index + 1), (expert.get("commit_sha") or "")[:10]
        lines.append(f"| {markdown_text(step)} | {markdown_text(name)} | {markdown_text(sha)} |")
    return "\n".join(lines)


def build_demo(config: dict[str, Any], bank: ModelBank | None = None) -> gr.Blocks:
    """The Gradio app for ``config`` (see :func:`load_config`)."""
    bank = bank or ModelBank()
    tasks: dict[str, list[str]] = dict(config.get("tasks") or {})
    title = config.get("title") or f"{config['model']}: zero-shot classification"
    config_dir = Path(config.get("_dir") or APP_DIR)
    task_examples = [e for e in config.get("examples") or [] if (config_dir / e["file"]).is_file()]
    examples = sorted(str(p) for p in (config_dir / "examples").glob("*.png")) if not task_examples else []
    choices = comparison_choices(config)

    def classify(image_path, labels_text, task, top_k, compare):
        image = open_image(image_path)
        if task and task != FREE_TEXT:
            if task not in tasks:
                raise gr.Error(f"Unknown task {task!r}.")
            labels = tuple(tasks[task])
        else:
            labels = parse_labels(labels_text)
        top_k = max(1, min(int(top_k or 5), MAX_TOP_K, len(labels)))
        merged = bank.get(config["model"], config.get("revision")).classify(image, labels)
        compared, caption = {}, "No comparison model selected."
        source = _source(config, compare) if compare and compare != NO_COMPARISON else None
        if source is not None:
            compared = bank.get(*source).classify(image, labels)
            caption = "Comparison: " + dict((v, k) for k, v in choices).get(compare, compare)
        return _top(merged, top_k), _top(compared, top_k), caption

    def show_task(task):
        if task and task != FREE_TEXT and task in tasks:
            return gr.Textbox(value=", ".join(tasks[task]), interactive=False)
        return gr.Textbox(interactive=True)

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {markdown_text(title)}\n{markdown_text(config.get('description') or '')}")
        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image", elem_id="image")
                    task = gr.Dropdown([FREE_TEXT, *tasks], value=FREE_TEXT, label="Candidate labels from", elem_id="task")
                    if task_examples:
                        # Picking an example also picks its task's classes as the candidate labels.
                        gr.Examples(
                            examples=[[str(config_dir / e["file"]), e["task"] if e["task"] in tasks else FREE_TEXT] for e in task_examples],
                            inputs=[image, task],
                            example_labels=[f"{e['task']}: {e['label']}" for e in task_examples],
                            label="Test images of the merged tasks",
                        )
                    elif examples:
                        gr.Examples(examples=examples, inputs=image, label="Examples")
                    labels = gr.Textbox(
                        label=f"Candidate labels (comma separated, at most {MAX_LABELS})",
                        placeholder="a cat, a dog, a red square",
                        value=config.get("default_labels") or "",
                        elem_id="labels",
                    )
                    with gr.Row():
                        top_k = gr.Slider(1, MAX_TOP_K, value=5, step=1, label="Top k", elem_id="top_k")
                        compare = gr.Dropdown(
                            choices, value=choices[0][1], label="Compare with", elem_id="compare"
                        )
                    button = gr.Button("Classify", variant="primary", elem_id="classify")
                with gr.Column():
                    merged_output = gr.Label(label="Merged model", elem_id="merged_output")
                    compare_caption = gr.Markdown(elem_id="compare_caption")
                    compare_output = gr.Label(label="Comparison model", elem_id="compare_output")
            # No API endpoint: gradio (5 and 6) handles False at run time; its annotation omits it.
            task.change(show_task, task, labels, api_name=False)  # type: ignore[arg-type]
            button.click(
                classify,
                [image, labels, task, top_k, compare],
                [merged_output, compare_output, compare_caption],
                api_name="classify",
            )
        with gr.Tab("Merge steps"):
            gr.Markdown(accuracy_markdown(config), elem_id="accuracy_table")
            plot = config.get("plot")
            if plot and (config_dir / plot).is_file():
                gr.Image(str(config_dir / plot), label="Accuracy after each merge step", interactive=False)
            gr.Markdown("### Lineage\n" + lineage_markdown(config))
    return demo


def _top(probabilities: dict[str, float], k: int) -> dict[str, float]:
    ranked = sorted(probabilities.items(), key=lambda item: item[1], reverse=True)
    return dict(ranked[:k])


if __name__ == "__main__":
    build_demo(load_config()).launch(max_file_size=MAX_IMAGE_BYTES)
