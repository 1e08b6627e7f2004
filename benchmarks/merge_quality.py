"""Merge quality on the offline zoo: every continual method, 10 random task orders, the paper's table.

For each method (opcm, average, task_arithmetic, ties, magmax) the one hyperparameter it has is chosen
from the same grid ({0.1, 0.3, 0.5, 0.7, 1.0}: OPCM's alpha, the scaling factor of the others) by the
average accuracy of the final merged model on the tasks' VALIDATION splits, merging in the canonical
task order. Then each method merges the experts in 10 random orders; after step t the merged model is
evaluated on task t's test split (acc_{t,t}) and after the last step on every test split (acc_{T,i}).
Reported: final average accuracy and backward transfer BWT = mean_{i<T}(acc_{T,i} - acc_{i,i}), mean
± std over the orders, next to the base's zero-shot accuracy and the individual experts.

The models are the offline zoo's (``hf_merge.zoo``): a small CLIP pretrained here, not OpenAI's
CLIP; the figures are not comparable with the paper's, only the protocol is.

    python benchmarks/merge_quality.py                # writes benchmarks/results/merge_quality.{md,json}
    python benchmarks/merge_quality.py --tiny --orders 2 --out /tmp/mq   # a quick smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hf_merge.evaluation import Evaluator, HeadCache
from hf_merge.merging.engine import ContinualMerger
from hf_merge.zoo import ZooConfig, build_zoo, register_offline_tasks, task_name

METHODS = ("opcm", "average", "task_arithmetic", "ties", "magmax")
GRID = (0.1, 0.3, 0.5, 0.7, 1.0)
TUNED = {"opcm": "alpha", "task_arithmetic": "scaling_factor", "ties": "scaling_factor", "magmax": "scaling_factor"}
RESULTS = Path(__file__).parent / "results"


class Bench:
    """Merges with the product's engine and evaluates with the product's evaluator."""

    def __init__(self, base: Path, experts: dict[str, Path], limit: int | None, workdir: Path):
        from transformers import CLIPModel, CLIPProcessor

        self.base, self.experts, self.workdir = base, experts, workdir
        self.tasks = list(experts)
        self.processor = CLIPProcessor.from_pretrained(base)
        self.model_cls = CLIPModel
        heads = HeadCache()  # the text tower never changes, so heads are computed once per task
        self.val = Evaluator([task_name(t, "val") for t in self.tasks], limit=limit, head_cache=heads, device="cpu")
        self.test = Evaluator([task_name(t) for t in self.tasks], limit=limit, head_cache=heads, device="cpu")

    def accuracy(self, folder: Path, tasks: list[str], split: str) -> dict[str, float]:
        model = self.model_cls.from_pretrained(folder, use_safetensors=True)
        evaluator = self.val if split == "val" else self.test
        out = evaluator.evaluate(model, self.processor, tasks=[task_name(t, split) for t in tasks])
        return {t: out[task_name(t, split)]["accuracy"] for t in tasks}

    def run(self, method: str, order: list[str], hyperparameters: dict, split: str, per_step: bool) -> dict:
        out_dir = Path(tempfile.mkdtemp(dir=self.workdir))
        diagonal: dict[str, float] = {}

        def on_step(step: int, folder: Path, state) -> None:
            if per_step and step < len(order):
                diagonal.update(self.accuracy(folder, [order[step - 1]], split))

        try:
            with ContinualMerger(self.base, out_dir / "m", method, hyperparameters=hyperparameters,
                                 on_step=on_step, device="cpu") as merger:
                merger.add_all([self.experts[t] for t in order])
            final = self.accuracy(out_dir / "m", order, split)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        diagonal[order[-1]] = final[order[-1]]
        result = {"final": final, "average": float(np.mean(list(final.values())))}
        if per_step:
            result["bwt"] = float(np.mean([final[t] - diagonal[t] for t in order[:-1]]))
        return result


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None, help="evaluate at most N images per task split")
    ap.add_argument("--tiny", action="store_true", help="use the miniature zoo (a smoke test of this script)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ft-steps", type=int, default=None, help="override the zoo's expert fine-tuning steps")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    config = ZooConfig.tiny() if args.tiny else ZooConfig()
    if args.ft_steps is not None:
        config = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, steps=args.ft_steps))
    zoo = build_zoo(config=config)
    register_offline_tasks()
    workdir = Path(tempfile.mkdtemp(prefix="hf-merge-bench-"))
    bench = Bench(zoo.base, zoo.experts, args.limit, workdir)
    tasks = bench.tasks
    zero_shot = bench.accuracy(zoo.base, tasks, "test")
    experts = {t: bench.accuracy(zoo.experts[t], [t], "test")[t] for t in tasks}
    print(f"zero-shot {np.mean(list(zero_shot.values())):.3f}  experts {np.mean(list(experts.values())):.3f}", flush=True)

    tuning: dict[str, dict[str, float]] = {}
    chosen: dict[str, dict] = {}
    for method in METHODS:
        if method not in TUNED:
            chosen[method] = {}
            continue
        scores = {}
        for value in GRID:
            hp = {TUNED[method]: value}
            scores[str(value)] = bench.run(method, tasks, hp, "val", per_step=False)["average"]
            print(f"tune {method} {TUNED[method]}={value}: val {scores[str(value)]:.3f}", flush=True)
        tuning[method] = scores
        best = max(GRID, key=lambda v: (scores[str(v)], -v))
        chosen[method] = {TUNED[method]: best}

    rng = np.random.default_rng(0)
    orders = [list(rng.permutation(tasks)) for _ in range(args.orders)]
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for method in METHODS:
        for order in orders:
            runs[method].append(bench.run(method, order, chosen[method], "test", per_step=True))
        print(f"{method}: {mean_std([r['average'] for r in runs[method]])}  BWT {mean_std([r['bwt'] for r in runs[method]])}",
              flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "zoo": {"fingerprint": zoo.root.name, "config": config.to_dict(), "tasks": tasks},
        "limit": args.limit, "orders": orders, "grid": list(GRID), "tuning_val": tuning, "chosen": chosen,
        "zero_shot_test": zero_shot, "experts_test": experts,
        "methods": {m: {"average": [r["average"] for r in rs], "bwt": [r["bwt"] for r in rs],
                        "final_per_task_mean": {t: float(np.mean([r["final"][t] for r in rs])) for t in tasks}}
                    for m, rs in runs.items()},
        "seconds": round(time.time() - started),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "merge_quality.md").write_text(render(report) + "\n")
    print(render(report))


def render(report: dict) -> str:
    tasks = report["zoo"]["tasks"]
    zs, ex = report["zero_shot_test"], report["experts_test"]
    lines = [
        f"# Merge quality on the offline zoo ({len(tasks)} tasks, {len(report['orders'])} random task orders)",
        "",
        "Small CLIP models built offline by `hf_merge.zoo` (not OpenAI's CLIP), test splits"
        + (f" (at most {report['limit']} images per task)" if report["limit"] else "") + ".",
        "Hyperparameters chosen on the validation splits from the grid "
        + ", ".join(str(v) for v in report["grid"]) + " (OPCM: alpha; others: scaling factor).",
        "",
        "| method | hyperparameters | average accuracy (%) | BWT (%) |",
        "|---|---|---|---|",
        f"| pretrained zero-shot | | {100 * np.mean(list(zs.values())):.1f} | |",
        f"| individual fine-tuned | | {100 * np.mean(list(ex.values())):.1f} | |",
    ]
    names = {"average": "continual average", "task_arithmetic": "continual task arithmetic",
             "ties": "continual TIES", "magmax": "MagMax", "opcm": "OPCM"}
    for method in ("average", "task_arithmetic", "ties", "magmax", "opcm"):
        r = report["methods"][method]
        hp = ", ".join(f"{k}={v}" for k, v in report["chosen"][method].items()) or "none"
        lines.append(f"| {names[method]} | {hp} | {mean_std(r['average'])} | {mean_std(r['bwt'])} |")
    lines += ["", "Final accuracy per task (%, mean over orders):", "",
              "| | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|",
              "| zero-shot | " + " | ".join(f"{100 * zs[t]:.1f}" for t in tasks) + " |",
              "| fine-tuned | " + " | ".join(f"{100 * ex[t]:.1f}" for t in tasks) + " |"]
    for method in ("average", "task_arithmetic", "ties", "magmax", "opcm"):
        per = report["methods"][method]["final_per_task_mean"]
        lines.append(f"| {names[method]} | " + " | ".join(f"{100 * per[t]:.1f}" for t in tasks) + " |")
    lines += ["", "Validation accuracy of the final model for each grid value (canonical order):", "",
              "| method | " + " | ".join(str(v) for v in report["grid"]) + " |", "|---" * (len(report["grid"]) + 1) + "|"]
    for method, scores in report["tuning_val"].items():
        lines.append(f"| {method} | " + " | ".join(f"{100 * scores[str(v)]:.1f}" for v in report["grid"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
