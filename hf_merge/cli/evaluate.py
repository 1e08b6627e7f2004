"""``hf-merge eval``: zero-shot accuracy of any CLIP model (folder or Hub repo) on named tasks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_merge.errors import EvaluationError, UsageError


def register(subparsers) -> None:
    """Add this group's subcommands to the ``hf-merge`` parser."""
    from hf_merge.cli import add_verbosity_flags

    parser = subparsers.add_parser(
        "eval",
        help="Zero-shot classification accuracy of a CLIP model on named tasks.",
        description=(
            "Evaluate CLIP models (local folders, repo ids or repo_id@revision) by zero-shot "
            "classification: class prompts embedded by the text tower, accuracy over each task's "
            "test split. Tasks are registry names (see --list-tasks) or image folders with one "
            "sub-folder per class. Several models (e.g. the base, every expert and the merged model) "
            "are evaluated against the same preprocessed images."
        ),
    )
    parser.add_argument("model", nargs="*", help="Folders, repo ids or repo_id@revision of CLIP models.")
    parser.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="Task names, image folders, or paper-8 / paper-14 / paper-20 for the published task sets.",
    )
    parser.add_argument("--limit", type=int, help="Evaluate at most N examples per task (evenly spaced).")
    parser.add_argument("--output", type=Path, help="Write the results as JSON to this file.")
    parser.add_argument("--batch-size", type=int, help="Images per forward pass (default: 256 on CUDA, else 64).")
    parser.add_argument("--device", help="Torch device (default: the Accelerate device, GPU if any).")
    parser.add_argument("--eval-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="Dtype of the forward pass (default: float32, as the paper).")
    parser.add_argument("--fast-preprocessing", action="store_true",
                        help="Use the torchvision image processor instead of the reference PIL one.")
    parser.add_argument("--workers", type=int, help="Processes preprocessing images (default: one per core, at most 8).")
    parser.add_argument("--base", help="Base CLIP model that completes tower-only checkpoints (CLIPVisionModel experts).")
    parser.add_argument("--token", help="Hub token for private repos (default: the logged-in token).")
    parser.add_argument("--list-tasks", action="store_true", help="Print the registered task names and exit.")
    add_verbosity_flags(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from hf_merge.evaluation import evaluate_models, get_task, list_tasks

    if args.list_tasks:
        for name in list_tasks():
            task = get_task(name)
            source = task.dataset.describe() if task.dataset else "-"
            print(f"{name:20s} {task.num_classes:4d} classes  {source}")
        return 0
    if not args.model or not args.tasks:
        raise UsageError("hf-merge eval needs a MODEL and --tasks TASK [TASK ...] (see --list-tasks)")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be a positive number of examples, got {args.limit}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    try:
        tasks = [get_task(name) for name in expand_task_sets(args.tasks)]
    except EvaluationError as error:
        raise UsageError(str(error)) from error
    all_results = evaluate_models(
        args.model, tasks, limit=args.limit, base=args.base, batch_size=args.batch_size, device=args.device,
        token=args.token, dtype=args.eval_dtype, fast_preprocessing=args.fast_preprocessing, workers=args.workers,
    )
    for model, results in zip(args.model, all_results, strict=False):
        if len(args.model) > 1:
            print(f"\n{model}")
        print(format_table(results))
    if args.output is not None:
        settings = {"limit": args.limit, "eval_dtype": args.eval_dtype,
                    "preprocessing": "torchvision" if args.fast_preprocessing else "pil"}
        if len(args.model) == 1:
            document = {"model": args.model[0], **settings, "results": all_results[0]}
        else:
            document = {**settings, "models": [{"model": m, "results": r} for m, r in zip(args.model, all_results, strict=False)]}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def expand_task_sets(names: list[str]) -> list[str]:
    """Replace ``paper-8``, ``paper-14`` and ``paper-20`` by their tasks; split comma-separated lists."""
    from hf_merge.evaluation import PAPER_TASKS_8, PAPER_TASKS_14, PAPER_TASKS_20

    sets = {"paper-8": PAPER_TASKS_8, "paper-14": PAPER_TASKS_14, "paper-20": PAPER_TASKS_20}
    expanded: list[str] = []
    for item in names:
        for name in (part.strip() for part in item.split(",")):
            if name:
                expanded.extend(sets.get(name.lower().replace("_", "-"), (name,)))
    return expanded


def format_table(results: dict[str, dict]) -> str:
    """One line per task (accuracy, top-5, examples) and the mean accuracy."""
    width = max([len("task"), *(len(name) for name in results)])
    lines = [f"{'task':{width}s}  accuracy  top-5     examples"]
    for name, metrics in results.items():
        skipped = metrics.get("undecodable") or 0
        lines.append(
            f"{name:{width}s}  {metrics['accuracy']:8.4f}  {metrics['top5_accuracy']:8.4f}  {metrics['num_samples']:8d}"
            + (f"  ({skipped} images could not be decoded)" if skipped else "")
        )
    if len(results) > 1:
        mean = sum(m["accuracy"] for m in results.values()) / len(results)
        lines.append(f"{'average':{width}s}  {mean:8.4f}")
    return "\n".join(lines)
