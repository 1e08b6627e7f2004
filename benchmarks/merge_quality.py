"""Merge quality on the offline zoo: every method, continual ones over 10 task orders, with and without ``--tune``.

Rows, each merging the zoo's 6 experts into its base with the product's engine:

- **fixed hyperparameters**: a method's tuned parameter (OPCM's alpha, the others' scaling factor) is
  chosen once from the method's own declared grid (``Parameter.tune_grid``) by the average accuracy
  of the final merged model on the tasks' VALIDATION splits, merging in the canonical task order; a
  method without a grid runs with its defaults. Continual methods then merge the experts in 10
  random orders; after step t the model is scored on task t's test split (acc_{t,t}) and after the
  last step on every test split (acc_{T,i}). All-at-once methods (Iso-CTS, WUDI) merge once, in the
  canonical order (their result does not depend on it).
- **--tune**: the same orders, with the product's per-step tuning (``hf_merge.merging.tuning`` with
  ``hf_merge.validation_scoring.ValidationScorer``): at step t every grid value is merged from the
  state of step t-1 and scored on the validation splits of tasks 1..t; the best is kept.

Reported: final average accuracy and BWT = mean_{i<T}(acc_{T,i} - acc_{i,i}), mean ± std over the
orders, beside the base's zero-shot accuracy and the individual experts. Test splits are only ever
used to report, never to choose.

The models are the offline zoo's (``hf_merge.zoo``): a small CLIP pretrained here, not OpenAI's
CLIP; the figures are not comparable with the paper's, only the protocol and the ranking are.

    python benchmarks/merge_quality.py --limit 500 --tune-limit 100 --tune-orders 5   # the README's table
    python benchmarks/merge_quality.py                # every image, --tune over all 10 orders (hours on 2 cores)
    python benchmarks/merge_quality.py --tiny --orders 2 --methods opcm iso_c --out /tmp/mq   # a smoke run
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
from typing import Any

import numpy as np
import torch

from hf_merge.evaluation import Evaluator, HeadCache
from hf_merge.merging.engine import ContinualMerger
from hf_merge.merging.methods import available_methods, get_method
from hf_merge.merging.tuning import StepTuner
from hf_merge.validation_scoring import ValidationScorer
from hf_merge.zoo import ZooConfig, build_zoo, register_offline_tasks, task_name

RESULTS = Path(__file__).parent / "results"


def tunable(method: str) -> str | None:
    """The parameter ``--tune`` chooses for ``method``, or None."""
    return next((p.name for p in get_method(method).parameters if p.tune_grid), None)


class Bench:
    """Merges with the product's engine and evaluates with the product's evaluator."""

    def __init__(self, base: Path, experts: dict[str, Path], limit: int | None, tune_limit: int | None, workdir: Path):
        from transformers import CLIPModel, CLIPProcessor

        self.base, self.experts, self.workdir, self.tune_limit = base, experts, workdir, tune_limit
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

    def run(self, method: str, order: list[str], hyperparameters: dict, split: str, per_step: bool,
            tune: bool = False) -> dict[str, Any]:
        out_dir = Path(tempfile.mkdtemp(dir=self.workdir))
        diagonal: dict[str, float] = {}

        def on_step(step: int, folder: Path, state) -> None:
            if per_step and step < len(order):
                diagonal.update(self.accuracy(folder, [order[step - 1]], split))

        tuner = None
        if tune:
            scorer = ValidationScorer(str(self.base), [task_name(t, "val") for t in order], per_expert=True,
                                      limit=self.tune_limit)
            tuner = StepTuner(scorer)
        continual = get_method(method).continual
        try:
            with ContinualMerger(self.base, out_dir / "m", method, hyperparameters=hyperparameters,
                                 on_step=on_step if continual else None, device="cpu", tuner=tuner) as merger:
                merger.add_all([self.experts[t] for t in order])
                tuning = list(merger.state.tuning or [])
            final = self.accuracy(out_dir / "m", order, split)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        diagonal[order[-1]] = final[order[-1]]
        result: dict[str, Any] = {"final": final, "average": float(np.mean(list(final.values())))}
        if per_step and continual:
            result["bwt"] = float(np.mean([final[t] - diagonal[t] for t in order[:-1]]))
        if tuning:
            result["chosen"] = [r["chosen"] for r in tuning]
        return result


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--limit", type=int, default=None, help="evaluate at most N images per task split")
    ap.add_argument("--tune-limit", type=int, default=None, help="validation images per task for --tune rows")
    ap.add_argument("--tune-orders", type=int, default=None, help="orders for the --tune rows (default: --orders; the first N)")
    ap.add_argument("--no-tune", action="store_true", help="leave out the --tune rows")
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
    methods = args.methods or available_methods()
    workdir = Path(tempfile.mkdtemp(prefix="hf-merge-bench-"))
    bench = Bench(zoo.base, zoo.experts, args.limit, args.tune_limit, workdir)
    tasks = bench.tasks
    zero_shot = bench.accuracy(zoo.base, tasks, "test")
    experts = {t: bench.accuracy(zoo.experts[t], [t], "test")[t] for t in tasks}
    print(f"zero-shot {np.mean(list(zero_shot.values())):.3f}  experts {np.mean(list(experts.values())):.3f}", flush=True)

    tuning: dict[str, dict[str, float]] = {}
    chosen: dict[str, dict] = {}
    for method in methods:
        parameter = tunable(method)
        if parameter is None:
            chosen[method] = {}
            continue
        scores = {}
        for value in get_method(method).parameter(parameter).tune_grid:
            scores[str(value)] = bench.run(method, tasks, {parameter: value}, "val", per_step=False)["average"]
            print(f"grid {method} {parameter}={value}: val {scores[str(value)]:.3f}", flush=True)
        tuning[method] = scores
        best = max(scores, key=lambda v: (scores[v], -float(v)))
        chosen[method] = {parameter: float(best)}

    rng = np.random.default_rng(0)
    orders = [list(rng.permutation(tasks)) for _ in range(args.orders)]
    rows: list[dict[str, Any]] = []
    for method in methods:
        continual = get_method(method).continual
        variants = [False] + ([True] if tunable(method) and not args.no_tune else [])
        for tune in variants:
            used = orders[:args.tune_orders] if tune and args.tune_orders else orders
            runs = [bench.run(method, order if continual else tasks, {} if tune else chosen[method], "test",
                              per_step=True, tune=tune)
                    for order in (used if continual else [tasks])]
            row = {"method": method, "continual": continual, "tune": tune,
                   "hyperparameters": "per step (--tune)" if tune else chosen[method],
                   "average": [r["average"] for r in runs], "bwt": [r["bwt"] for r in runs if "bwt" in r],
                   "final_per_task_mean": {t: float(np.mean([r["final"][t] for r in runs])) for t in tasks},
                   "chosen_per_step": [r.get("chosen") for r in runs] if tune else None}
            rows.append(row)
            print(f"{method}{' --tune' if tune else ''}: {mean_std(row['average'])}  BWT {mean_std(row['bwt'])}", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "zoo": {"fingerprint": zoo.root.name, "config": config.to_dict(), "tasks": tasks},
        "limit": args.limit, "tune_limit": args.tune_limit, "tune_orders": args.tune_orders or args.orders,
        "orders": orders, "tuning_val": tuning, "chosen": chosen,
        "zero_shot_test": zero_shot, "experts_test": experts, "rows": rows,
        "seconds": round(time.time() - started),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "merge_quality.md").write_text(render(report) + "\n")
    print(render(report))


def _label(row: dict[str, Any]) -> str:
    name = get_method(row["method"]).display_name or row["method"]
    kind = "continual" if row["continual"] else "all at once"
    return f"{name} ({kind}{', --tune' if row['tune'] else ''})"


def _hyper(row: dict[str, Any]) -> str:
    if row["tune"]:
        values = [v for chosen in row["chosen_per_step"] or [] for v in (chosen or [])]
        return "chosen per step: " + ", ".join(f"{v:g}" for v in sorted(set(values))) if values else "chosen per step"
    return ", ".join(f"{k}={v:g}" for k, v in row["hyperparameters"].items()) or "defaults"


def render(report: dict) -> str:
    tasks = report["zoo"]["tasks"]
    zs, ex = report["zero_shot_test"], report["experts_test"]
    n_orders = len(report["orders"])
    lines = [
        f"# Merge quality on the offline zoo ({len(tasks)} tasks; continual methods over {n_orders} random task orders)",
        "",
        "Small CLIP models built offline by `hf_merge.zoo` (not OpenAI's CLIP), test splits"
        + (f" (at most {report['limit']} images per task)" if report["limit"] else "") + ".",
        "Fixed rows: the tuned parameter chosen once from the method's declared grid on the validation splits "
        "(final model, canonical order). `--tune` rows: chosen at every step by the product's tuner on the "
        "validation splits of the tasks merged so far"
        + (f" (at most {report['tune_limit']} images per task)" if report.get("tune_limit") else "")
        + (f", over the first {report['tune_orders']} orders" if report.get("tune_orders", n_orders) != n_orders else "") + ".",
        "All-at-once methods merge once (their result does not depend on the order): no ± and no BWT.",
        "",
        "| method | hyperparameters | average accuracy (%) | BWT (%) |",
        "|---|---|---|---|",
        f"| pretrained zero-shot | | {100 * np.mean(list(zs.values())):.1f} | |",
        f"| individual fine-tuned | | {100 * np.mean(list(ex.values())):.1f} | |",
    ]
    ranked = sorted(report["rows"], key=lambda r: -statistics.mean(r["average"]))
    for row in ranked:
        lines.append(f"| {_label(row)} | {_hyper(row)} | {mean_std(row['average'])} | {mean_std(row['bwt'])} |")
    lines += ["", "Final accuracy per task (%, mean over orders):", "",
              "| | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|",
              "| zero-shot | " + " | ".join(f"{100 * zs[t]:.1f}" for t in tasks) + " |",
              "| fine-tuned | " + " | ".join(f"{100 * ex[t]:.1f}" for t in tasks) + " |"]
    for row in ranked:
        per = row["final_per_task_mean"]
        lines.append(f"| {_label(row)} | " + " | ".join(f"{100 * per[t]:.1f}" for t in tasks) + " |")
    lines += ["", "Validation accuracy of the final model for each value of the method's grid (canonical order):", ""]
    for method, scores in report["tuning_val"].items():
        cells = ", ".join(f"{v}: {100 * s:.1f}" for v, s in scores.items())
        lines.append(f"- {method} ({tunable(method)}): {cells}")
    lines += ["", f"Took {report['seconds']} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
