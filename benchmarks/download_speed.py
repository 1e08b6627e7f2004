"""Download speed: today's sequential full downloads against prefetching, ranged downloads, and both.

Eight experts are merged (task arithmetic by default, ``--scope vision``, ``--evict``) from the local Hub server,
throttled to a fixed bandwidth so downloads cost what they cost on a real link. The models have
ViT-B/32's layout (12 + 12 layers, patch 32, 224 px, every tensor name of
``openai/clip-vit-base-patch32``) at half its widths and half its vocabulary, in float16: 58.7 % of
the bytes are in the vision tower, as in the real model (58.1 %), and one expert is 74 MiB instead
of 577 MiB, so the four runs finish in minutes.

Each configuration runs in a fresh process with an empty Hub cache (the base is a local copy, so
only expert bytes go over the link). Bytes are counted by the server; wall time is the whole
8-expert loop (downloads, merges, writes, evictions). Results: a table on stdout and
``benchmarks/results/download_speed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VISION = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 6,
          "image_size": 224, "patch_size": 32}
TEXT = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 4,
        "vocab_size": 24704, "bos_token_id": 24702, "eos_token_id": 24703, "pad_token_id": 1}
CONFIGS = [  # (label, prefetch ahead, ranged)
    ("sequential, full (today)", 0, False),
    ("prefetch, full", 1, False),
    ("sequential, ranged", 0, True),
    ("prefetch + ranged", 1, True),
]
USER, TOKEN = "bench", "hf_bench_token_not_secret"


def build_models(folder: Path, n_experts: int) -> tuple[Path, list[Path]]:
    """A base and ``n_experts`` float16 experts (vision tower perturbed), built once."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel

    base = folder / "base"
    if not (base / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=512)).half()
        staging = folder / "base.building"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        shutil.rmtree(base, ignore_errors=True)
        staging.rename(base)
    experts = [folder / f"expert-{i}" for i in range(n_experts)]
    for i, expert in enumerate(experts):
        if (expert / "model.safetensors").is_file():
            continue
        tensors = load_file(str(base / "model.safetensors"))
        generator = torch.Generator().manual_seed(100 + i)
        for name, weight in tensors.items():
            if name.startswith(("vision_model.", "visual_projection.")) and weight.is_floating_point():
                noise = torch.randn(weight.shape, generator=generator) * (0.02 * float(weight.float().std() or 1.0))
                tensors[name] = (weight.float() + noise).to(weight.dtype)
        staging = expert.with_name(expert.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copy2(base / "config.json", staging / "config.json")
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(expert, ignore_errors=True)
        staging.rename(expert)
    return base, experts


def publish(server, base: Path, experts: list[Path]) -> list[str]:
    """Upload the experts to the local Hub once (a stored repo is reused)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=server.url, token=TOKEN)
    repos = []
    for i, folder in enumerate(experts):
        repo = f"{USER}/clip-half-b32-expert-{i}"
        if not api.repo_exists(repo):
            api.create_repo(repo)
            api.upload_folder(repo_id=repo, folder_path=folder, commit_message="expert")
        repos.append(repo)
    return repos


def child(base: str, experts: list[str], ahead: int, partial: bool, out: str, method: str) -> dict:
    """One timed configuration (run in a fresh process with its own empty HF_HOME)."""
    from hf_merge.hub import sources
    from hf_merge.hub.prefetch import Prefetcher
    from hf_merge.io.validation import SCOPES
    from hf_merge.merging.engine import ContinualMerger

    prefixes = SCOPES["vision"] if partial else None

    def fetch(reference, transfer):
        return sources.resolve(reference, tensor_prefixes=prefixes, transfer=transfer)

    started = time.perf_counter()
    merge_seconds = 0.0
    with ContinualMerger(base, out, method) as merger:
        with Prefetcher(experts, fetch, ahead=ahead, discard=sources.evict) as fetched:
            for source in fetched:
                step = merger.add(source)
                merge_seconds += step.merge_seconds + step.save_seconds
                sources.evict(source)
    return {"seconds": time.perf_counter() - started, "merge_seconds": merge_seconds}


def run_config(server, base: Path, repos: list[str], ahead: int, partial: bool, work: Path, method: str) -> dict:
    home = Path(tempfile.mkdtemp(prefix="hf-home-", dir=work))
    out = work / f"out-{ahead}-{int(partial)}"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HOME=str(home), HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN,
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(HERE.parent))
    args = [sys.executable, __file__, "--child", json.dumps([str(base), repos, ahead, partial, str(out), method])]
    served = server.bytes_served
    done = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["bytes"] = server.bytes_served - served
    row["weights"] = out / "model.safetensors"
    shutil.rmtree(home, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--bandwidth", type=float, default=10.0, help="MB/s the server sends (default 10)")
    parser.add_argument("--method", default="task_arithmetic", help="merge method (default task_arithmetic)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    from hf_merge.hub_server import LocalHubServer

    cache = HERE / ".cache" / "download-speed"
    cache.mkdir(parents=True, exist_ok=True)
    base, experts = build_models(cache / "models", args.experts)
    expert_bytes = (experts[0] / "model.safetensors").stat().st_size
    work = Path(tempfile.mkdtemp(prefix="download-speed-", dir=cache))
    rows = []
    try:
        with LocalHubServer(cache / "hub", tokens={USER: TOKEN}) as server:
            repos = publish(server, base, experts)
            server.bandwidth_bytes_per_s = args.bandwidth * 1e6
            for label, ahead, partial in CONFIGS:
                print(f"running: {label}", file=sys.stderr, flush=True)
                rows.append({"label": label, **run_config(server, base, repos, ahead, partial, work, args.method)})
        identical = all(_same(rows[0]["weights"], row["weights"]) for row in rows[1:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(rows, args, expert_bytes, identical)
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "download_speed.md").write_text(text)


def _same(left: Path, right: Path) -> bool:
    return left.read_bytes() == right.read_bytes()


def render(rows: list[dict], args: argparse.Namespace, expert_bytes: int, identical: bool) -> str:
    first = rows[0]
    lines = [
        "# Download speed: prefetching and ranged downloads",
        "",
        f"{args.experts} experts merged with `{args.method}` (`--scope vision`, evicting each expert once merged) from the local",
        f"Hub server throttled to {args.bandwidth:g} MB/s. Models: ViT-B/32 layout at half width and half vocabulary,",
        f"float16, {expert_bytes / 2**20:.0f} MiB per expert (58.7 % of it in the vision tower; ViT-B/32: 58.1 %).",
        "Every run starts with an empty Hub cache; bytes are what the server sent for the experts.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other",
        "engineers' work while it ran, so absolute times vary between runs; the ratios come from the same run.",
        "",
        "| configuration | wall s | merge + write s | MB sent | time vs today | bytes vs today |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['seconds']:.1f} | {row['merge_seconds']:.1f} | {row['bytes'] / 1e6:,.0f} "
            f"| {row['seconds'] / first['seconds']:.2f} | {row['bytes'] / first['bytes']:.2f} |"
        )
    lines += [
        "",
        f"Merged weights byte-identical across the four configurations: {'yes' if identical else 'NO'}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
