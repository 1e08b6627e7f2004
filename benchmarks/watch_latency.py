"""Watch latency: seconds from a candidate's push to the merged commit, on the local Hub.

A merged repo (base + one expert, OPCM, evaluated) is published on an in-process local Hub and a
watcher has mirrored it (as a running watcher has). Another user pushes a fine-tune of the base;
the clock starts when that push returns, and one watcher pass runs at once (what a webhook
delivery triggers; in poll mode add up to one ``--interval``). The pass is split into:

- discovery: ``list_models(filter="base_model:finetune:<base>")`` and the ledger/lineage checks;
- download: the candidate's files (after the preflight of its config);
- merge: ``hf-merge add`` of the candidate into a copy of the mirror (with its evaluation row);
- gate: the quality gate (old tasks before/after, candidate task), ``eval_limit`` examples per task;
- push: one commit of weights, card, state, recipe, results and ledger.

Shapes: the tests' tiny CLIP, and a ViT-B/32-shaped CLIP (``CLIPConfig()`` defaults, 151M
parameters, random weights, built as in ``merge_speed.py``). ``--quick`` runs the tiny one only.
Results: a table on stdout and ``benchmarks/results/watch_latency.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ("discovery", "download", "merge", "gate", "push")


def _prepare_env() -> None:
    sys.path.insert(0, str(HERE.parent))
    from hf_merge.testing.net import free_port

    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-merge-bench-home-")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.pop("HF_TOKEN", None)


def vit_b32_models(cache: Path) -> tuple[Path, Path, Path]:
    """Base, expert and candidate of ViT-B/32 shape, with a processor so the gate can evaluate."""
    sys.path.insert(0, str(HERE))
    from merge_speed import build_models
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from hf_merge.testing.tiny_clip import build_tokenizer

    base, experts = build_models(cache, 2, quick=False)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 224},
                                                                    crop_size={"height": 224, "width": 224}),
                              tokenizer=build_tokenizer())
    for folder in (base, *experts):
        if not (folder / "preprocessor_config.json").is_file():
            processor.image_processor.save_pretrained(folder)
            processor.tokenizer.save_pretrained(folder)
    return base, experts[0], experts[1]


def tiny_models(root: Path) -> tuple[Path, Path, Path]:
    from hf_merge.testing.tiny_clip import build_tiny_zoo

    base, experts = build_tiny_zoo(root, 2, seed=0)
    return base, experts[0], experts[1]


def measure(shape: str, base_dir: Path, expert_dir: Path, candidate_dir: Path, work: Path, eval_limit: int) -> dict:
    from huggingface_hub import HfApi

    from hf_merge.hub_server import LocalHubServer
    from hf_merge.testing.watch_models import merged_repo, publish, write_card
    from hf_merge.watch.policy import AdmissionPolicy
    from hf_merge.watch.runner import Watcher

    tokens = {"alice": "hf_alice_bench_token_1", "bob": "hf_bob_bench_token_22"}
    port = int(os.environ["HF_ENDPOINT"].rsplit(":", 1)[1])
    with LocalHubServer(work / "hub", port=port, tokens=tokens):
        alice = HfApi(endpoint=os.environ["HF_ENDPOINT"], token=tokens["alice"])
        bob = HfApi(endpoint=os.environ["HF_ENDPOINT"], token=tokens["bob"])
        repo, base_repo = merged_repo(alice, tokens["alice"], f"bench-{shape}", base_dir, [expert_dir], work,
                                      tasks=["synthetic/colors"], eval_limit=eval_limit)
        candidate = work / "candidate"
        shutil.copytree(candidate_dir, candidate)
        write_card(candidate, base_repo, extra="datasets:\n- synthetic/colors")
        policy = AdmissionPolicy(max_forgetting=100.0, min_gain=-100.0, eval_limit=eval_limit)
        watcher = Watcher(repo, work_dir=work / "watcher", token=tokens["alice"], policy=policy)
        assert watcher.run_once() == []  # the mirror is warm, as in a running watcher
        publish(bob, f"bob/bench-{shape}-ft", candidate)
        pushed = time.perf_counter()
        outcomes = watcher.run_once()
        total = time.perf_counter() - pushed
        assert [o.status for o in outcomes] == ["merged"], outcomes
        phases = {"discovery": watcher.last_timings["discovery"], **outcomes[0].timings}
        return {"shape": shape, "total": total, **{p: phases.get(p, 0.0) for p in PHASES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--eval-limit", type=int, default=32)
    args = parser.parse_args()
    _prepare_env()
    rows = []
    cache = HERE / ".cache"
    shapes = [("tiny", lambda: tiny_models(cache / "watch-tiny"))]
    if not args.quick:
        shapes.append(("vit-b32", lambda: vit_b32_models(cache)))
    for shape, build in shapes:
        models = build()
        with tempfile.TemporaryDirectory(prefix=f"hf-merge-bench-{shape}-") as tmp:
            rows.append(measure(shape, *models, Path(tmp), args.eval_limit))
        print(rows[-1], file=sys.stderr)
    header = "| model | " + " | ".join(PHASES) + " | push → merged commit |"
    lines = [header, "|---" * (len(PHASES) + 2) + "|"]
    for row in rows:
        lines.append(f"| {row['shape']} | " + " | ".join(f"{row[p]:.2f}" for p in PHASES) + f" | **{row['total']:.2f}** |")
    table = "\n".join(lines)
    print(table)
    note = (f"Seconds, one run each, on {platform.machine()} with {os.cpu_count()} CPUs (a machine shared with "
            f"other jobs, so expect noise), local Hub in the same process, eval limit {args.eval_limit} per task. "
            "The total also counts the pass's own Hub calls (head check, ledger), so it exceeds the sum of phases.")
    out = HERE / "results" / "watch_latency.md"
    out.write_text(f"# Watch latency (`benchmarks/watch_latency.py`)\n\n{table}\n\n{note}\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
