"""Merge speed and memory: the streaming engine against the naive all-in-memory implementation.

On ViT-B/32-shaped CLIP checkpoints (``CLIPConfig()`` defaults, 151M parameters; random weights,
experts = base + low-rank and dense task vectors on the vision tower), merge 2, 4 and 8 experts with
every method. Each run happens in a fresh subprocess, which reports its wall time and peak resident
memory (``ru_maxrss``). Also measured: the bare cost of the SVDs OPCM needs (the SVD calls alone over
the same tensors), to see what the rest of the engine adds.

Models are written once to ``benchmarks/.cache/``. ``--quick`` uses a smaller model and fewer
experts. Results: a table on stdout and ``benchmarks/results/merge_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["opcm", "average", "task_arithmetic", "ties", "magmax"]
QUICK_SHAPE = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4}


def peak_rss() -> int:
    """Peak resident memory of this process in bytes.

    /proc's VmHWM belongs to this program image; ru_maxrss would also count the parent's memory
    at fork time, which Linux carries across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- models ----------------------------------------------------------------------------------------
def build_models(cache: Path, n_experts: int, quick: bool) -> tuple[Path, list[Path]]:
    """A base and ``n_experts`` experts, built once (a finished folder is never rebuilt)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel

    from hf_merge.testing.tiny_clip import task_vector

    folder = cache / ("clip-quick" if quick else "clip-vit-b32")
    base = folder / "base"
    experts = [folder / f"expert-{i}" for i in range(n_experts)]
    if not (base / "model.safetensors").is_file():
        staging = folder.with_name(folder.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        config = CLIPConfig(vision_config=QUICK_SHAPE, text_config=QUICK_SHAPE) if quick else CLIPConfig()
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(staging / "base")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(base, ignore_errors=True)
        (staging / "base").rename(base)
        staging.rmdir()
    for i, expert in enumerate(experts):
        if (expert / "model.safetensors").is_file():
            continue
        print(f"building expert {i} in {expert}", file=sys.stderr)
        tensors = load_file(str(base / "model.safetensors"))
        for name, weight in tensors.items():
            if name.startswith(("vision_model.", "visual_projection.")) and weight.is_floating_point():
                tensors[name] = weight + task_vector(name, weight, seed=100 + i, scale=0.02, rank=8).to(weight.dtype)
        staging = expert.with_name(expert.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copy2(base / "config.json", staging / "config.json")
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(expert, ignore_errors=True)
        staging.rename(expert)
    return base, experts


# -- children (each measured in its own process) -----------------------------------------------------
def child_streaming(method: str, out: str, base: str, experts: list[str]) -> dict:
    import torch

    from hf_merge.engine import merge

    svd_seconds = [0.0]
    real_svd = torch.linalg.svd

    def timed_svd(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real_svd(*args, **kwargs)
        finally:
            svd_seconds[0] += time.perf_counter() - started

    torch.linalg.svd = timed_svd  # only timed, so the SVD share of a run is known under any load
    baseline = peak_rss()
    result = merge(base, experts, method, out)
    steps = result.steps
    return {
        "svd_seconds": svd_seconds[0],
        "seconds": result.timings["merge_seconds"] + result.timings["save_seconds"],
        "setup_seconds": result.timings["setup_seconds"],
        "peak_rss": peak_rss(),
        "baseline_rss": baseline,
        "later_steps_seconds": sum(s.merge_seconds + s.save_seconds for s in steps[1:]),
    }


def child_svd(base: str, experts: list[str]) -> dict:
    """The SVDs OPCM's steps 2..n do, alone: one reduced SVD per linear weight of D_t.

    D_t = M_{t−1} − θ0 gains a task vector's worth of rank at each step, and SVD time depends on
    the spectrum, so step t's SVDs are timed on the mean of τ_1..τ_{t−1} (what D_t spans)."""
    import torch

    from hf_merge.checkpoint import Checkpoint
    from hf_merge.validation import linear_weight_names, merged_names

    with Checkpoint.open(base) as b:
        names = sorted(linear_weight_names(b.config, merged_names(b, "vision")))
        theta0 = {n: b.get(n).float() for n in names}
    total = {n: torch.zeros_like(t) for n, t in theta0.items()}
    seconds = 0.0
    for t, expert in enumerate(experts[:-1], start=1):
        with Checkpoint.open(expert) as e:
            for n in names:
                total[n] += e.get(n).float() - theta0[n]
        deltas = [total[n] / t for n in names]
        started = time.perf_counter()
        for delta in deltas:
            torch.linalg.svd(delta, full_matrices=False)
        seconds += time.perf_counter() - started
    return {"seconds": seconds / max(len(experts) - 1, 1), "count": len(names)}


def run_child(args: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    done = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_abs_diff(left: Path, right: Path) -> float:
    from hf_merge.checkpoint import Checkpoint

    with Checkpoint.open(left) as a, Checkpoint.open(right) as b:
        return max(float((a.get(n).float() - b.get(n).float()).abs().max()) for n in a.names())


# -- the table -------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 2 and 4 experts")
    parser.add_argument("--experts", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--opcm-experts", type=int, nargs="+", default=None,
                        help="expert counts for OPCM (its SVDs dominate the run time); default: --experts")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive implementation")
    parser.add_argument("--naive-opcm-max", type=int, default=None,
                        help="run the naive OPCM (full-matrix SVDs, the slowest part) only up to this many experts")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "merge_speed.md")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        report = child_streaming(rest[0], rest[1], rest[2], rest[3:]) if kind == "streaming" else child_svd(rest[0], rest[1:])
        print(json.dumps(report))
        return

    counts = args.experts or ([2, 4] if args.quick else [2, 4, 8])
    base, experts = build_models(args.cache, max(counts), args.quick)
    model_bytes = (base / "model.safetensors").stat().st_size
    work = args.cache / "runs"
    rows, svd_rows = [], []
    svd = None  # the bare SVD run of the largest OPCM merge, for the text
    # cheap methods first, OPCM last: the table is written after every run, so it is useful even if
    # the long OPCM runs are cut short
    for method in sorted(args.methods, key=lambda m: m == "opcm"):
        for n in (args.opcm_experts or counts) if method == "opcm" else counts:
            shutil.rmtree(work, ignore_errors=True)
            stream = run_child([sys.executable, __file__, "--child", "streaming", method, str(work / "stream"),
                                str(base), *map(str, experts[:n])])
            row = {"method": method, "n": n, "stream": stream, "naive": None, "diff": None}
            skip_naive = method == "opcm" and args.naive_opcm_max is not None and n > args.naive_opcm_max
            if not args.no_naive and not skip_naive:
                row["naive"] = run_child([sys.executable, str(HERE / "naive_reference.py"), method, str(work / "naive"),
                                          str(base), *map(str, experts[:n])])
                row["diff"] = max_abs_diff(work / "stream", work / "naive")
            rows.append(row)
            print(format_row(row, model_bytes), flush=True)
            if method == "opcm" and n > 1:
                svd = run_child([sys.executable, __file__, "--child", "svd", str(base), *map(str, experts[:n])])
                per_step = stream["later_steps_seconds"] / (n - 1)
                svd_rows.append((n, per_step, svd["seconds"], stream["svd_seconds"] / (n - 1)))
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(render(rows, svd_rows, svd, model_bytes, args.quick))
    shutil.rmtree(work, ignore_errors=True)
    print(render(rows, svd_rows, svd, model_bytes, args.quick))


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def format_row(row: dict, model_bytes: int) -> str:
    stream, naive, n = row["stream"], row["naive"], row["n"]
    cells = [row["method"], str(n), f"{stream['seconds'] / n:.2f}"]
    cells.append(f"{naive['seconds'] / n:.2f}" if naive else "-")
    cells.append(f"{naive['seconds'] / stream['seconds']:.2f}" if naive else "-")
    cells += [mb(stream["peak_rss"]), mb(stream["peak_rss"] - stream["baseline_rss"])]
    cells.append(mb(naive["peak_rss"]) if naive else "-")
    cells.append(f"{stream['peak_rss'] / model_bytes:.2f}")
    cells.append(f"{row['diff']:.1e}" if row["diff"] is not None else "-")
    return "| " + " | ".join(cells) + " |"


def render(rows: list[dict], svd_rows: list[tuple], svd: dict | None, model_bytes: int, quick: bool) -> str:
    import torch

    lines = [
        "# Merge speed and memory",
        "",
        f"Model: {'small CLIP (--quick)' if quick else 'ViT-B/32-shaped CLIP (CLIPConfig defaults)'}, "
        f"{mb(model_bytes)} MiB of float32 weights; vision tower + visual_projection merged. "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads). Each run in a fresh process; times include reading inputs "
        "and writing the merged model.",
        "",
        "Streaming = hf_merge.engine (one model resident, reduced SVDs); naive = benchmarks/naive_reference.py "
        "(every model in memory, full-matrix SVDs). Peak RSS counts the interpreter and its imports; "
        "\"+ over imports\" is the growth after importing. Δ = max |streaming − naive| over all weights.",
        "",
        "| method | experts | streaming s/expert | naive s/expert | naive/streaming time | streaming peak RSS MiB "
        "| + over imports MiB | naive peak RSS MiB | streaming RSS / model size | Δ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [format_row(row, model_bytes) for row in rows]
    setup = sum(r["stream"]["setup_seconds"] for r in rows) / max(len(rows), 1)
    lines += [
        "",
        "Streaming s/expert = (merging + writing every step) / experts. Not included: the one-off set-up "
        f"of a streaming run (opening the checkpoints, reading their headers), "
        f"{setup:.2f} s on average. Naive s/expert = (loading + merging + writing once) / experts.",
    ]
    if svd is not None:
        lines += [
            "",
            f"OPCM against the bare cost of its SVDs: steps 2..n each need {svd['count']} reduced SVDs (one per "
            "nn.Linear weight; step 1 needs none). \"Bare\" is the same count of `torch.linalg.svd` calls alone in "
            "a separate process, on D_t = mean(τ_1..τ_{t−1}) for t = 2..n (SVD time depends on the spectrum, "
            "which fills up as experts are merged). The SVD calls inside each OPCM run are timed too: the ratio "
            "of the step time to them compares the same matrices under the same load.",
            "",
            "| experts | OPCM s/step (steps ≥ 2, incl. writing) | bare SVD s/step (separate run) | ratio to bare "
            "| SVD s/step inside the run | ratio to SVDs of the same run |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {n} | {step:.2f} | {bare:.2f} | {step / bare:.2f} | {inside:.2f} | {step / inside:.2f} |"
            for n, step, bare, inside in svd_rows
        ]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
