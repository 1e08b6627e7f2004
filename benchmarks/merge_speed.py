"""Merge speed and memory: the streaming engine against the naive all-in-memory implementation.

On ViT-B/32-shaped CLIP checkpoints (``CLIPConfig()`` defaults, 151M parameters; random weights,
experts = base + low-rank and dense task vectors on the vision tower), merge 2, 4 and 8 experts with
every method. Each run happens in a fresh subprocess, which reports its wall time and peak resident
memory (``VmHWM``). OPCM runs once per decomposition (``svd``, ``gram_mixed``, ``gram64``, ``gram32``), with the time
spent inside the SVD / eigh calls, and every result is compared with a float64 OPCM (exact SVDs,
float64 arithmetic); average and task arithmetic run with their default ``checkpoint_every`` and
with a write after every step, and against the naive code a second time with its one write
fsynced, as every file the engine writes is.

The all-at-once methods (``iso_cts``, ``wudi``) have no naive counterpart here; their rows show time
and peak RSS (one model for the output plus one tensor per expert). WUDI is 400 Adam steps per
matrix: on a CPU, measure it at reduced width (``--width 128``: ViT-B/32's 12 layers at hidden size
128; the full width runs in ``benchmarks/gpu_check.sh``).

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
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["opcm", "average", "task_arithmetic", "ties", "magmax", "iso_c", "tsv_m", "iso_cts", "wudi", "dop"]
ALL_AT_ONCE = ("iso_cts", "wudi")  # no naive counterpart in naive_reference.py
# DOP has no naive counterpart either (naive_reference.py does not implement it)
NO_NAIVE = ALL_AT_ONCE + ("dop",)
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
def width_shape(width: int) -> dict:
    """ViT-B/32's depth at another width (hidden ``width``, MLP 4×, 64-wide heads)."""
    return {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": 12,
            "num_attention_heads": max(width // 64, 1)}


def build_models(cache: Path, n_experts: int, quick: bool, width: int | None = None) -> tuple[Path, list[Path]]:
    """A base and ``n_experts`` experts, built once (a finished folder is never rebuilt)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel

    from hf_merge.testing.tiny_clip import task_vector

    folder = cache / (f"clip-width-{width}" if width else "clip-quick" if quick else "clip-vit-b32")
    base = folder / "base"
    experts = [folder / f"expert-{i}" for i in range(n_experts)]
    if not (base / "model.safetensors").is_file():
        staging = folder.with_name(folder.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        shape = width_shape(width) if width else QUICK_SHAPE if quick else None
        config = CLIPConfig(vision_config=shape, text_config=shape) if shape else CLIPConfig()
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
def child_streaming(method: str, out: str, base: str, experts: list[str], options: dict | None = None) -> dict:
    """One streaming merge. ``options``: method hyperparameters plus the engine's ``checkpoint_every``,
    ``compute_dtype`` and ``snapshot_steps`` (copy the weights written at these steps to ``out``-N,
    so one float64 run gives the references of several expert counts)."""
    import torch

    from hf_merge.merging.engine import merge_weights as merge

    options = dict(options or {})
    if "linalg" in options:  # read when the method is made, inside merge()
        os.environ["HF_MERGE_LINALG"] = options.pop("linalg")
    engine = {k: options.pop(k) for k in ("checkpoint_every", "compute_dtype") if k in options}
    snapshots = set(options.pop("snapshot_steps", []))
    decomposition_seconds = [0.0]

    def timed(real):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                decomposition_seconds[0] += time.perf_counter() - started
        return call

    # only timed, so the decompositions' share of a run is known under any load
    from hf_merge.merging.methods.linalg_backend import Linalg

    torch.linalg.svd = timed(torch.linalg.svd)
    Linalg.eigh_lower = timed(Linalg.eigh_lower)  # torch's eigh or numpy's, whichever runs

    def on_step(step, output_dir, state):
        if step in snapshots:
            keep = Path(f"{out}-{step}")
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "model.safetensors"):
                shutil.copy2(Path(output_dir) / name, keep / name)

    baseline = peak_rss()
    started = time.perf_counter()
    # on_step only where snapshots are wanted: a caller watching steps makes the engine write every step
    result = merge(base, experts, method, out, on_step=on_step if snapshots else None, **engine, **options)
    steps = result.steps
    return {
        "svd_seconds": decomposition_seconds[0],
        "seconds": time.perf_counter() - started,  # the whole call: set-up, merging, writing, closing
        "setup_seconds": result.timings["setup_seconds"],
        "peak_rss": peak_rss(),
        "baseline_rss": baseline,
        "later_steps_seconds": sum(s.merge_seconds + s.save_seconds for s in steps[1:]),
        "writes": sum(1 for s in steps if s.save_seconds > 0),
    }


def run_child(args: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    # Every run starts with no dirty pages: the naive code leaves its output in the page cache, and
    # the kernel writing it back would otherwise slow down whichever run comes next.
    os.sync()
    done = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fastest(reports: list[dict]) -> dict:
    """The fastest of repeated runs (the others only lost time to whatever else ran)."""
    return min(reports, key=lambda report: report["seconds"])


def median(reports: list[dict]) -> float | None:
    """The median time of repeated runs (``None`` for none): beside the fastest where they are close."""
    return statistics.median(report["seconds"] for report in reports) if reports else None


def max_abs_diff(left: Path, right: Path) -> float:
    from hf_merge.io.checkpoint import Checkpoint

    with Checkpoint.open(left) as a, Checkpoint.open(right) as b:
        return max(float((a.get(n).float() - b.get(n).float()).abs().max()) for n in a.names())


# -- the table -------------------------------------------------------------------------------------
DECOMPOSITIONS = ["svd", "gram_mixed", "gram64", "gram32"]
CHEAP = ("average", "task_arithmetic")  # methods whose step is cheaper than writing the model
WRITTEN_COST = ("iso_c", "tsv_m")  # methods whose decompositions happen when a step is written
DOP_STEPS = [200]  # set from --dop-steps


def variants(method: str, decompositions: list[str], backends: list[str]) -> list[tuple[str, dict]]:
    """(label, options) of the streaming runs measured for ``method``; the first is the default.

    OPCM runs each decomposition on the backend ``auto`` picks, and each Gram decomposition on the
    other ``backends`` too (the SVD path is torch's on every backend)."""
    if method == "opcm":
        from hf_merge.merging.methods import get_method
        from hf_merge.merging.methods.linalg_backend import resolve

        default, auto = get_method(method).defaults["decomposition"], resolve("auto").name
        found = []
        for d in decompositions:
            label = f"decomposition={d}" + (" (default)" if d == default else "")
            if d == "svd":
                found.append((label, {"decomposition": d}))
                continue
            for backend in [auto] + [b for b in backends if b != auto]:
                found.append((label + f", linalg={backend}" + (" (auto)" if backend == auto else ""),
                              {"decomposition": d, "linalg": backend}))
        return found
    if method == "dop":  # 200 Adam steps per layer by default: --dop-steps measures fewer
        steps = DOP_STEPS[0]
        return [(f"num_steps={steps}" + (" (default)" if steps == 200 else ""), {"num_steps": steps})]
    if method in CHEAP:
        from hf_merge.merging.methods import get_method

        default = get_method(method).checkpoint_every
        return [(f"checkpoint_every={default} (default)", {})] + [
            (f"checkpoint_every={n}", {"checkpoint_every": n}) for n in (1, 4, 8) if n != default]
    if method in WRITTEN_COST:
        from hf_merge.merging.methods import get_method

        default = get_method(method).checkpoint_every
        return [(f"checkpoint_every={default} (default)", {}), ("checkpoint_every=1 (every step written)", {"checkpoint_every": 1})]
    return [("default", {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 2 and 4 experts")
    parser.add_argument("--experts", type=int, nargs="+", default=None)
    parser.add_argument("--width", type=int, default=None,
                        help="ViT-B/32's 12 layers at this hidden size (WUDI on a CPU: 128); default: the full model")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--opcm-experts", type=int, nargs="+", default=None,
                        help="expert counts for OPCM (its decompositions dominate the run time); default: --experts")
    parser.add_argument("--decompositions", nargs="+", default=DECOMPOSITIONS, choices=DECOMPOSITIONS,
                        help="OPCM decompositions to measure (the first default run is the method's default)")
    parser.add_argument("--linalg", nargs="+", default=["torch", "openblas"], choices=["torch", "openblas"],
                        help="backends to run OPCM's Gram decompositions on, besides the one auto picks")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive implementation")
    parser.add_argument("--no-float64", action="store_true", help="skip the float64 OPCM reference")
    parser.add_argument("--naive-opcm-max", type=int, default=None,
                        help="run the naive OPCM (full-matrix SVDs, the slowest part) only up to this many experts")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each non-OPCM measurement, naive and streaming interleaved; the fastest "
                             "counts (a few seconds each, and noisy on a shared machine)")
    parser.add_argument("--opcm-repeat", type=int, default=2, help="the same for OPCM (minutes per run)")
    parser.add_argument("--dop-steps", type=int, default=200,
                        help="DOP's Adam steps per layer (200, the default, takes minutes per expert on a CPU)")
    parser.add_argument("--note", default="", help="a line about the machine's state, printed under the table")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "merge_speed.md")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(child_streaming(rest[0], rest[1], rest[2], rest[4:], json.loads(rest[3]))))
        return

    counts = args.experts or ([2, 4] if args.quick else [2, 4, 8])
    DOP_STEPS[0] = args.dop_steps
    opcm_counts = args.opcm_experts or counts
    base, experts = build_models(args.cache, max(counts + opcm_counts), args.quick, args.width)
    model_bytes = (base / "model.safetensors").stat().st_size
    work = args.cache / "runs"
    shutil.rmtree(work, ignore_errors=True)
    rows: list[dict] = []
    accuracy: dict[int, dict[str, float]] = {}
    context = {"model_bytes": model_bytes, "quick": args.quick, "width": args.width, "note": args.note, "repeat": max(args.repeat, 1),
               "opcm_repeat": max(args.opcm_repeat, 1)}

    def stream(method: str, n: int, options: dict, out: Path) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        return run_child([sys.executable, __file__, "--child", "streaming", method, str(out), str(base),
                          json.dumps(options), *map(str, experts[:n])])

    def naive_merge(method: str, n: int, out: Path, *flags: str) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        return run_child([sys.executable, str(HERE / "naive_reference.py"), *flags, method, str(out), str(base),
                          *map(str, experts[:n])])

    if "opcm" in args.methods and not args.no_float64:
        # One float64 run (exact SVDs, float64 arithmetic) gives the reference of every count.
        reference = work / "float64"
        stream("opcm", max(opcm_counts), {"decomposition": "svd", "svd_dtype": "float64", "compute_dtype": "float64",
                                          "checkpoint_every": 1, "snapshot_steps": opcm_counts}, reference)
    # cheap methods first, OPCM last: the table is written after every run, so it is useful even if
    # the long OPCM runs are cut short
    for method in sorted(args.methods, key=lambda m: m == "opcm"):
        repeats = max(args.opcm_repeat if method == "opcm" else args.repeat, 1)
        for n in opcm_counts if method == "opcm" else counts:
            naive_dir, f64 = work / "naive", work / f"float64-{n}"
            skip_naive = method in NO_NAIVE or (
                method == "opcm" and args.naive_opcm_max is not None and n > args.naive_opcm_max)
            naive_runs: list[dict] = []
            durable_runs: list[dict] = []  # the naive code with its one write fsynced, as ours are
            runs: dict[str, list[dict]] = {}
            diffs: dict[str, float] = {}
            # Repeats interleaved (naive, every variant, naive, ...): a slow spell of the machine
            # touches every contender, not the repeats of one.
            for _ in range(repeats):
                if not args.no_naive and not skip_naive:
                    naive_runs.append(naive_merge(method, n, naive_dir))
                    if method in CHEAP:
                        durable_runs.append(naive_merge(method, n, work / "naive-fsync", "--fsync"))
                for label, options in variants(method, args.decompositions, args.linalg):
                    out, first = work / "stream", label not in runs
                    runs.setdefault(label, []).append(stream(method, n, options, out))
                    if first:  # every repeat merges the same weights
                        if naive_runs:
                            diffs[label] = max_abs_diff(out, naive_dir)
                        if method == "opcm" and f64.is_dir():
                            accuracy.setdefault(n, {})[accuracy_label(options)] = max_abs_diff(out, f64)
            if method == "opcm" and f64.is_dir() and naive_runs:
                accuracy.setdefault(n, {})["naive (float32 full SVD)"] = max_abs_diff(naive_dir, f64)
            naive = fastest(naive_runs) if naive_runs else None
            for label, options in variants(method, args.decompositions, args.linalg):
                row = {"method": method, "variant": label, "n": n, "stream": fastest(runs[label]), "naive": naive,
                       "diff": diffs.get(label), "naive_fsync": fastest(durable_runs) if durable_runs else None,
                       "medians": {"stream": median(runs[label]), "naive": median(naive_runs),
                                   "naive_fsync": median(durable_runs)}}
                if method == "opcm":
                    row["diff64"] = accuracy.get(n, {}).get(accuracy_label(options))
                rows.append(row)
                print(format_row(row, model_bytes), flush=True)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(render(rows, accuracy, context))
    shutil.rmtree(work, ignore_errors=True)
    print(render(rows, accuracy, context))


def model_label(context: dict) -> str:
    if context.get("width"):
        return f"CLIP with ViT-B/32's 12 layers at width {context['width']} (--width)"
    return "small CLIP (--quick)" if context["quick"] else "ViT-B/32-shaped CLIP (CLIPConfig defaults)"


def accuracy_label(options: dict) -> str:
    return options["decomposition"] + (f" ({options['linalg']})" if "linalg" in options else "")


def openblas_core() -> str:
    """The kernel numpy's OpenBLAS runs here (``OPENBLAS_CORETYPE`` can pin it), or why none."""
    import ctypes

    from hf_merge.merging.methods import linalg_backend

    lib = linalg_backend.numpy_openblas()
    if lib is None:
        return "no OpenBLAS with per-thread control in numpy"
    for symbol in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"):
        getter = getattr(lib, symbol, None)
        if getter is not None:
            getter.restype = ctypes.c_char_p
            core = getter().decode()
            pinned = os.environ.get("OPENBLAS_CORETYPE")
            return f"{core} kernels" + (f" (pinned by OPENBLAS_CORETYPE={pinned})" if pinned else " (detected)")
    return "kernel unknown"


def cpu_model() -> str:
    """The processor's name: LAPACK's speed differs by vendor (MKL's eigh on AMD, for one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def format_row(row: dict, model_bytes: int) -> str:
    stream, naive, n = row["stream"], row["naive"], row["n"]
    cells = [row["method"], row["variant"], str(n), f"{stream['seconds'] / n:.2f}"]
    cells.append(f"{naive['seconds'] / n:.2f}" if naive else "-")
    cells.append(f"{naive['seconds'] / stream['seconds']:.2f}" if naive else "-")
    cells.append(f"{stream['svd_seconds'] / max(n - 1, 1):.2f}" if row["method"] == "opcm" else "-")
    cells.append(str(stream["writes"]))
    cells += [mb(stream["peak_rss"]), mb(stream["peak_rss"] - stream["baseline_rss"])]
    cells.append(mb(naive["peak_rss"]) if naive else "-")
    cells.append(f"{stream['peak_rss'] / model_bytes:.2f}")
    cells.append(f"{row['diff']:.1e}" if row["diff"] is not None else "-")
    cells.append(f"{row['diff64']:.1e}" if row.get("diff64") is not None else "-")
    return "| " + " | ".join(cells) + " |"


def render(rows: list[dict], accuracy: dict[int, dict[str, float]], context: dict) -> str:
    import numpy
    import torch

    from hf_merge.merging.methods import linalg_backend

    model_bytes = context["model_bytes"]
    lines = [
        "# Merge speed and memory",
        "",
        f"Model: {model_label(context)}, "
        f"{mb(model_bytes)} MiB of float32 weights; vision tower + visual_projection merged. "
        f"Machine: {platform.machine()} ({cpu_model()}), {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, BLAS {'MKL' if linalg_backend.torch_blas_is_mkl() else 'not MKL'}), "
        f"numpy {numpy.__version__} (OpenBLAS: {openblas_core()}); `linalg=auto` is "
        f"{linalg_backend.resolve('auto').name} here. Each run in a fresh process, started after a `sync` so "
        "that no run pays for the previous one's writes; each time is the fastest of "
        f"{context['opcm_repeat']} (OPCM) or {context['repeat']} (others) runs, the naive and streaming "
        "runs interleaved; times include reading inputs and writing the merged model.",
    ]
    if context["note"]:
        lines += ["", context["note"]]
    lines += [
        "",
        "Streaming = hf_merge.merging.engine (one model resident); naive = benchmarks/naive_reference.py "
        "(every model in memory, float32 full-matrix SVDs, written once). Peak RSS counts the interpreter "
        "and its imports; \"+ over imports\" is the growth after importing. Δ naive = max |streaming − naive| "
        "over all weights; Δ float64 = max |streaming − float64 OPCM| (exact SVDs and float64 arithmetic "
        "in the same engine, rounded to the checkpoint's float32).",
        "",
        "| method | variant | experts | streaming s/expert | naive s/expert | naive/streaming time "
        "| svd+eigh s/step | writes | streaming peak RSS MiB | + over imports MiB | naive peak RSS MiB "
        "| streaming RSS / model size | Δ naive | Δ float64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [format_row(row, model_bytes) for row in rows]
    setup = sum(r["stream"]["setup_seconds"] for r in rows) / max(len(rows), 1)
    lines += [
        "",
        "Streaming s/expert = the whole `merge()` call (opening and checking the checkpoints, merging, "
        f"writing the steps that are written) / experts; its set-up alone took {setup:.2f} s on average. "
        "Naive s/expert = (loading + merging + writing once) / experts. svd+eigh s/step: time inside "
        "`torch.linalg.svd` / the backend's `eigh` per OPCM step (steps 2..n), summed over the worker threads, "
        "timed in the same run. linalg: where the Gram paths' products and `eigh` ran (torch's MKL or numpy's "
        "OpenBLAS; see hf_merge/merging/methods/linalg_backend.py). "
        "writes: how many complete models the run wrote (checkpoint_every; the last step always).",
    ]
    durable = [row for row in rows if row.get("naive_fsync") and row["variant"].endswith("(default)")]
    if durable:
        lines += [
            "",
            "At the same guarantee: the naive code's one write fsynced before its clock stops, as every "
            "file hf-merge writes is (`naive_reference.py --fsync`, interleaved with the runs above):",
            "",
            "| method | experts | streaming s/expert | naive s/expert | naive + fsync s/expert "
            "| naive/streaming time | naive + fsync/streaming time | medians: naive, naive + fsync over streaming |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in durable:
            n, stream = row["n"], row["stream"]["seconds"]
            naive, synced = row["naive"]["seconds"], row["naive_fsync"]["seconds"]
            medians = row["medians"]
            naive_median, synced_median = (medians[key] / medians["stream"] for key in ("naive", "naive_fsync"))
            lines.append(f"| {row['method']} | {n} | {stream / n:.2f} | {naive / n:.2f} | {synced / n:.2f} "
                         f"| {naive / stream:.2f} | {synced / stream:.2f} | {naive_median:.2f} / {synced_median:.2f} |")
    if accuracy:
        found = [label for diffs in accuracy.values() for label in diffs]
        labels = ["naive (float32 full SVD)"] + [label for label in dict.fromkeys(found) if not label.startswith("naive")]
        lines += [
            "",
            "OPCM, max |merged − float64 OPCM| over all weights, side by side:",
            "",
            "| experts | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for n, diffs in sorted(accuracy.items()):
            lines.append(f"| {n} | " + " | ".join(f"{diffs[label]:.1e}" if label in diffs else "-" for label in labels) + " |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
