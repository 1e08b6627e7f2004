"""GPU check: a CUDA merge against the CPU merge, and seconds per expert on ViT-B/32 and ViT-L/14 shapes.

Run through ``benchmarks/gpu_check.sh`` (which finds or makes a Python with torch). Built to finish
in under 4 minutes on one GPU: random ViT-shaped models are made in memory (no download, no disk
cache), 3 experts per shape, and each case runs once.

Reports, per shape: OPCM (default decomposition, and ``svd`` on B/32) and TIES seconds per expert on CUDA;
on B/32 also the all-at-once methods at full width: WUDI (its default 400 Adam steps per matrix, and 5
steps, whose CUDA − CPU difference is measured: the CPU run of 400 steps at this width takes too long)
and Iso-CTS (GPU only),
the same merge's max |CUDA − CPU| over all weights (B/32 only: the CPU run of L/14 is too slow for the
budget), peak GPU memory, and the decompositions alone (every linear weight of one merged task
vector, SVD vs Gram + eigh, on the GPU); and zero-shot evaluation in images/s of a ViT-B/32-shaped CLIP
at 224 px (first pass with preprocessing, then cache warm in float32 and bfloat16). Prints a table and
writes ``benchmarks/results/gpu_check.md``.
Exits with status 2 and one line when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {
    "ViT-B/32": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "patch_size": 32, "projection": 512},
    "ViT-L/14": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "patch_size": 14, "projection": 768},
}


def make_models(folder: Path, shape: dict, n_experts: int) -> tuple[Path, list[Path]]:
    """A random CLIP with the vision tower of ``shape`` (a 1-layer text tower: it is not merged)
    and ``n_experts`` experts = base + task vectors on the vision tower."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    from hf_merge.testing.tiny_clip import task_vector

    vision = {k: v for k, v in shape.items() if k != "projection"}
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=shape["projection"])
    CLIPModel(config).save_pretrained(folder / "base")
    base = {n: t.clone() for n, t in _load(folder / "base").items()}
    experts = []
    for i in range(n_experts):
        tensors = {n: (t + task_vector(n, t, seed=100 + i, scale=0.02, rank=8).to(t.dtype))
                   if n.startswith(("vision_model.", "visual_projection.")) and t.is_floating_point() else t
                   for n, t in base.items()}
        expert = folder / f"expert-{i}"
        expert.mkdir()
        (expert / "config.json").write_bytes((folder / "base" / "config.json").read_bytes())
        save_file(tensors, str(expert / "model.safetensors"), metadata={"format": "pt"})
        experts.append(expert)
    return folder / "base", experts


def _load(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def timed_merge(base: Path, experts: list[Path], method: str, out: Path, device: str, **options) -> tuple[float, float]:
    """(seconds per expert, peak GPU memory in MiB) of one merge."""
    import torch

    from hf_merge.merging.engine import merge_weights as merge

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    merge(base, experts, method, out, device=device, **options)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / len(experts)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    return seconds, peak


def max_abs_diff(left: Path, right: Path) -> float:
    a, b = _load(left), _load(right)
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


def decomposition_seconds(base: Path, experts: list[Path]) -> dict[str, float]:
    """The decompositions of one OPCM step alone, on the GPU: D = mean of two task vectors."""
    import torch

    from hf_merge.io.checkpoint import Checkpoint
    from hf_merge.io.validation import linear_weight_names, merged_names
    from hf_merge.merging.methods.opcm_linalg import gram_pairs

    with Checkpoint.open(base) as b, Checkpoint.open(experts[0]) as e0, Checkpoint.open(experts[1]) as e1:
        names = sorted(linear_weight_names(b.config, merged_names(b, "vision")))
        deltas = [((e0.get(n) + e1.get(n)) / 2 - b.get(n)).cuda() for n in names]
    result = {}
    for label, run in (
        ("svd", lambda d: torch.linalg.svd(d, full_matrices=False, driver="gesvd")),
        ("gram64", lambda d: gram_pairs(d if d.shape[0] >= d.shape[1] else d.T, torch.float64)),
        ("gram32", lambda d: gram_pairs(d if d.shape[0] >= d.shape[1] else d.T, torch.float32)),
    ):
        run(deltas[0])  # warm-up: kernels load on first use
        torch.cuda.synchronize()
        started = time.perf_counter()
        for d in deltas:
            run(d)
        torch.cuda.synchronize()
        result[label] = time.perf_counter() - started
    result["count"] = len(deltas)
    return result


def evaluation_speed(folder: Path, images: int = 4096) -> list[tuple[str, float]]:
    """Images/s of ``hf-merge eval``'s path on CUDA: first pass (preprocessing), then warm, fp32 and bf16."""
    from hf_merge.evaluation import DatasetSpec, Evaluator, HeadCache, PixelCache, Task
    from hf_merge.evaluation.synthetic import COLOR_NAMES
    from hf_merge.testing.tiny_clip import build_tiny_clip

    model_dir = build_tiny_clip(folder / "eval-b32", image_size=224, patch_size=32, hidden_size=768, num_layers=12,
                                num_heads=12, projection_dim=512)
    per_class = images // len(COLOR_NAMES)
    task = Task("gpu-eval", COLOR_NAMES, ("a photo of a {}.",), DatasetSpec(
        kind="python", path="hf_merge.evaluation.synthetic:solid_colors", options={"n_per_class": per_class, "size": 224}))
    import torch

    cache, rows = PixelCache(cache_dir=folder / "pixels"), []

    def timed(label: str, evaluator: Evaluator, model: object, processor: object) -> None:
        torch.cuda.synchronize()
        started = time.perf_counter()
        evaluator.evaluate(model, processor)
        torch.cuda.synchronize()
        rows.append((label, per_class * len(COLOR_NAMES) / (time.perf_counter() - started)))
        print(f"evaluation {label}: {rows[-1][1]:,.0f} images/s", flush=True)

    for dtype in ("float32", "bfloat16"):
        heads = HeadCache()
        evaluator = Evaluator([task], device="cuda", dtype=dtype, head_cache=heads, pixel_cache=cache)
        model, processor = evaluator.prepare(str(model_dir))
        heads.get(model, processor.tokenizer, task, device="cuda")  # the text tower's work, outside the timing
        if dtype == "float32":
            timed("first pass (preprocessing in workers), float32", evaluator, model, processor)
        else:
            evaluator.evaluate(model, processor)  # warm-up of the bf16 kernels
        timed(f"warm cache, {dtype}", evaluator, model, processor)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--results", type=Path, default=HERE / "results" / "gpu_check.md")
    parser.add_argument("--eval-images", type=int, default=4096, help="Images of the evaluation measurement.")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing measured", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE.parent))
    gpu = torch.cuda.get_device_name(0)
    rows, decomp = [], []
    with tempfile.TemporaryDirectory(prefix="hf-merge-gpu-") as tmp:
        for label in args.shapes:
            folder = Path(tmp) / label.replace("/", "-")
            folder.mkdir()
            base, experts = make_models(folder, SHAPES[label], args.experts)
            cases = [("opcm", "default", {}), ("ties", "default", {})]
            if label == "ViT-B/32":  # the exact path too; on L/14 its 145 GPU SVDs alone would take minutes
                cases.insert(1, ("opcm", "svd", {"decomposition": "svd"}))
                # all at once, full width: every expert's tensor per name; WUDI's 400 steps per matrix
                cases += [("wudi", "default", {}), ("wudi", "iter_num=5", {"iter_num": 5}), ("iso_cts", "default", {})]
            for method, variant, options in cases:
                out = folder / f"{method}-{variant}"
                seconds, peak = timed_merge(base, experts, method, out / "cuda", "cuda", **options)
                diff = "-"
                # the CPU side of WUDI's 400 steps or Iso-CTS's ~440 SVDs would take minutes: 5 WUDI steps stand for both
                if label == "ViT-B/32" and (variant == "iter_num=5" if method in ("wudi", "iso_cts") else variant == "default"):
                    timed_merge(base, experts, method, out / "cpu", "cpu", **options)
                    diff = f"{max_abs_diff(out / 'cuda', out / 'cpu'):.1e}"
                rows.append((label, method, variant, seconds, peak, diff))
                print(f"{label} {method} {variant}: {seconds:.2f} s/expert, peak {peak:,.0f} MiB, |CUDA-CPU| {diff}", flush=True)
            d = decomposition_seconds(base, experts)
            decomp.append((label, d))
        speeds = evaluation_speed(Path(tmp), args.eval_images)
    lines = [
        "# GPU check",
        "",
        f"Device: {gpu}; torch {torch.__version__}. Random CLIP models with the named vision tower, "
        f"{args.experts} experts; s/expert includes reading and writing (every step for OPCM and TIES; once, "
        "after all the experts, for the all-at-once WUDI and Iso-CTS).",
        "",
        "| shape | method | variant | s/expert | peak GPU MiB | max abs CUDA − CPU |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {s} | {m} | {v} | {sec:.2f} | {peak:,.0f} | {diff} |" for s, m, v, sec, peak, diff in rows]
    lines += ["", "Decompositions alone (every nn.Linear weight of one merged task vector, on the GPU, seconds):", "",
              "| shape | matrices | svd (gesvd) | gram64 (DᵀD + eigh, float64) | gram32 |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {d['count']} | {d['svd']:.2f} | {d['gram64']:.2f} | {d['gram32']:.2f} |" for s, d in decomp]
    lines += ["", f"Zero-shot evaluation, ViT-B/32 shape at 224 px, {args.eval_images} images, batch 256 "
              "(`hf-merge eval`'s path; first pass = decoding and preprocessing in workers too):", "",
              "| pass | images/s |", "|---|---|"]
    lines += [f"| {label} | {rate:,.0f} |" for label, rate in speeds]
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
