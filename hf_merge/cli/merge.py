"""``hf-merge merge | add | card | push``: argument parsing only; the work is in :mod:`hf_merge.api`."""

from __future__ import annotations

import argparse
from typing import Any

from hf_merge.cli import add_verbosity_flags

_EPILOG_MERGE = """examples:
  hf-merge merge --base openai/clip-vit-base-patch32 \\
      --experts tanganke/clip-vit-base-patch32_sun397 tanganke/clip-vit-base-patch32_dtd \\
      --method opcm --alpha 0.5 --eval sun397 dtd --eval-every-step --push-to-hub me/clip-opcm
  hf-merge merge --config examples/paper_vit_b32_8tasks.yaml --output runs/tsv-m
"""


def register(subparsers: Any) -> None:
    """Add ``merge``, ``add``, ``card`` and ``push`` to the ``hf-merge`` parser."""
    _register_merge(subparsers)
    _register_add(subparsers)
    _register_card(subparsers)
    _register_push(subparsers)


# ----------------------------------------------------------------------------------- merge
def _register_merge(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="Merge fine-tuned CLIP models into a base, one after another.",
        description="Merge fine-tuned CLIP models (repo ids or folders) into a base model, one expert at a "
        "time; optionally evaluate each step, write a model card and push everything to the Hub.",
        epilog=_EPILOG_MERGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="RECIPE.yaml", help="Read the recipe from YAML; flags given here override it.")
    parser.add_argument("--base", metavar="REPO[@REV]", help="The pretrained model (repo id or local folder).")
    parser.add_argument("--experts", nargs="+", metavar="REPO[@REV]", help="Fine-tuned models, merged in this order.")
    _add_method_flags(parser)
    parser.add_argument("--scope", choices=["vision", "text", "all"], help="Towers to merge (default: vision).")
    _add_eval_flags(parser)
    parser.add_argument("--output", "-o", metavar="DIR", help="Output folder (default: the repo name, or merged-<method>).")
    _add_hub_flags(parser)
    parser.add_argument("--private", action="store_true", default=None, help="Create the model repo private.")
    parser.add_argument("--space", metavar="USER/NAME", help="Also publish a Gradio Space demo of the merged model.")
    parser.add_argument("--seed", type=int, help="Seed for --shuffle.")
    parser.add_argument("--shuffle", action="store_true", default=None, help="Merge the experts in a seeded random order.")
    parser.add_argument("--allow-pickle", action="store_true", default=None, help="Accept .bin checkpoints (loaded with weights_only=True).")
    parser.add_argument("--evict", action="store_true", default=None, help="Delete each expert from the cache once merged.")
    _add_partial_flag(parser)
    parser.add_argument("--checkpoint-every", type=int, metavar="N",
                        help="Write the output after every N-th step (the last always; default: the method's).")
    add_verbosity_flags(parser)
    parser.set_defaults(func=run_merge)


def _add_partial_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-partial-download", dest="partial_download", action="store_false", default=None,
                        help="Download whole expert snapshots, not only the tensors in --scope.")


def _add_eval_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval", nargs="+", metavar="TASK", help="Evaluate on these tasks (names, comma or space separated).")
    group.add_argument("--eval-every-step", action="store_true", default=None, help="Evaluate after every step, not only at the end.")
    group.add_argument("--eval-limit", type=int, metavar="N", help="At most N test examples per task.")
    group.add_argument("--eval-dtype", choices=("float32", "bfloat16", "float16"),
                       help="Dtype of the evaluation's forward pass (default float32, as the paper).")
    group.add_argument("--fast-preprocessing", action="store_true", default=None,
                       help="Preprocess with the torchvision image processor instead of the reference PIL one.")
    group.add_argument("--tune", action="store_true", default=None,
                       help="Choose the method's scaling (or alpha) at every step from its declared grid by the validation "
                            "accuracy of each candidate merge on the --eval tasks (never their test splits).")


def _add_hub_flags(parser: argparse.ArgumentParser, *, push_help: str = "Push the result to this model repo.") -> None:
    parser.add_argument("--push-to-hub", metavar="USER/NAME", help=push_help)
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login). Never printed or saved.")
    parser.add_argument("--create-pr", action="store_true", help="Push as a pull request.")


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    """``--method`` and each method parameter's flags, from the methods' own declarations."""
    from hf_merge.merging.methods.registry import METHODS

    listing = ", ".join(f"{name} ({cls.display_name or name})" for name, cls in METHODS.items())
    parser.add_argument("--method", help=f"Merge method (default: opcm): {listing}.")
    group = parser.add_argument_group("method parameters (unset ones take the method's defaults)")
    for flags, declared in _flag_groups().items():
        methods = ", ".join(method for method, _ in declared)
        first = declared[0][1]
        text = f"{methods}: {first.help}" if len({p.name for _, p in declared}) == 1 else f"{methods}: " + "; ".join(
            f"{p.name}" for _, p in declared)
        dest = _flag_dest(flags)
        if first.type is bool:
            group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(*flags, dest=dest, type=first.type, default=None, metavar=first.name.upper(), help=text)
    group.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="Any method parameter (repeatable).")


def _flag_groups() -> dict[tuple[str, ...], list[tuple[str, Any]]]:
    """``{flags: [(method, Parameter), ...]}``: a flag several methods declare is one option."""
    from hf_merge.merging.methods.registry import METHODS

    groups: dict[tuple[str, ...], list[tuple[str, Any]]] = {}
    for name, cls in METHODS.items():
        for parameter in cls.parameters:
            if parameter.flags:
                groups.setdefault(tuple(parameter.flags), []).append((name, parameter))
    return groups


def _flag_dest(flags: tuple[str, ...]) -> str:
    return "method_flag_" + flags[0].lstrip("-").replace("-", "_")


def run_merge(args: argparse.Namespace) -> int:
    _apply_quiet(args)
    from hf_merge.errors import UsageError
    from hf_merge.recipe import MergeRecipe
    from hf_merge.recipe_overrides import build_recipe
    from hf_merge.resume import merge_or_resume

    base = MergeRecipe.load(args.config) if args.config else None
    fields = _recipe_fields(args, method=args.method or (base.method if base is not None else None))
    if base is None:
        missing = [flag for flag, key in (("--base", "base"), ("--experts", "experts")) if not fields.get(key)]
        if missing:
            raise UsageError(f"{' and '.join(missing)} required (or --config RECIPE.yaml)")
    recipe = build_recipe(base, fields, source=args.config or "the command line")
    # The same command again after a crash continues the merge in its output folder.
    result = merge_or_resume(recipe, token=args.token, create_pr=args.create_pr)
    _print_summary(result, quiet=args.quiet)
    return 0


def _recipe_fields(args: argparse.Namespace, method: str | None = None) -> dict[str, Any]:
    """Recipe fields the user set on the command line (unset flags leave the YAML's values).

    A parameter flag sets the parameter that ``method`` (default: the flags' ``--method``, else
    opcm) declares with that flag.
    """
    from hf_merge.errors import UsageError

    fields: dict[str, Any] = {}
    for key in ("base", "experts", "method", "scope", "output", "push_to_hub", "private", "space", "seed", "shuffle", "allow_pickle", "evict",
                "partial_download", "checkpoint_every", "tune"):
        value = getattr(args, key, None)
        if value is not None:
            fields[key] = value
    method = method or getattr(args, "method", None) or "opcm"
    parameters: dict[str, Any] = {}
    for flags, declared in _flag_groups().items():
        value = getattr(args, _flag_dest(flags), None)
        if value is None:
            continue
        mine = [parameter for owner, parameter in declared if owner == method]
        if not mine:
            owners = ", ".join(owner for owner, _ in declared)
            raise UsageError(f"{flags[0]} is a parameter of {owners}, not of method {method!r}; see hf-merge merge --help")
        parameters[mine[0].name] = value
    for item in args.param:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param expects KEY=VALUE, got {item!r}")
        parameters[key.strip()] = _parse_value(raw)
    if parameters:
        fields["parameters"] = parameters
    evaluation = _eval_fields(args)
    if evaluation:
        fields["eval"] = evaluation
    return fields


def _eval_fields(args: argparse.Namespace) -> dict[str, Any]:
    evaluation: dict[str, Any] = {}
    if args.eval:
        evaluation["tasks"] = [t.strip() for item in args.eval for t in item.split(",") if t.strip()]
    if args.eval_every_step:
        evaluation["every_step"] = True
    if args.eval_limit is not None:
        evaluation["limit"] = args.eval_limit
    if args.eval_dtype is not None:
        evaluation["dtype"] = args.eval_dtype
    if args.fast_preprocessing:
        evaluation["fast_preprocessing"] = True
    return evaluation


def _parse_value(raw: str) -> Any:
    from hf_merge.errors import RecipeError
    from hf_merge.io.yaml_file import load_yaml

    try:
        return load_yaml(raw, source="--param")
    except RecipeError:  # not YAML: the text itself
        return raw


# ----------------------------------------------------------------------------------- add
def _register_add(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "add",
        help="Merge more experts into a model made by hf-merge and push a new commit.",
        description="Continue a merge: download MERGED (repo id or folder) with its merge state, merge the new "
        "experts after the existing ones and push a new commit (or a pull request with --create-pr).",
        epilog="example:\n  hf-merge add me/clip-opcm --experts tanganke/clip-vit-base-patch32_mnist --create-pr",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("merged", metavar="MERGED", help="Repo id (USER/NAME[@REV]) or local folder of an hf-merge result.")
    parser.add_argument("--experts", nargs="+", required=True, metavar="REPO[@REV]", help="New experts, merged in this order.")
    parser.add_argument("--output", "-o", metavar="DIR", help="Local folder for the continued merge (default: the repo name).")
    _add_eval_flags(parser)
    _add_hub_flags(parser, push_help="Push to this repo (default: the repo MERGED came from).")
    parser.add_argument("--space", metavar="USER/NAME", help="Also (re)publish a Gradio Space.")
    parser.add_argument("--allow-pickle", action="store_true", default=None, help="Accept .bin checkpoints.")
    parser.add_argument("--evict", action="store_true", default=None, help="Delete each expert from the cache once merged.")
    _add_partial_flag(parser)
    add_verbosity_flags(parser)
    parser.set_defaults(func=run_add)


def run_add(args: argparse.Namespace) -> int:
    _apply_quiet(args)
    from hf_merge.api import add
    from hf_merge.recipe import EvalSpec

    evaluation = _eval_fields(args)
    spec = None
    if evaluation:
        spec = EvalSpec(tasks=evaluation.get("tasks", []), every_step=evaluation.get("every_step", False), limit=evaluation.get("limit"),
                        dtype=evaluation.get("dtype", "float32"), fast_preprocessing=evaluation.get("fast_preprocessing", False))
    result = add(
        args.merged,
        args.experts,
        token=args.token,
        output=args.output,
        push_to_hub=args.push_to_hub,
        create_pr=args.create_pr,
        eval=spec,
        allow_pickle=args.allow_pickle,
        evict=args.evict,
        space=args.space,
        partial_download=args.partial_download,
        tune=args.tune,
    )
    _print_summary(result, quiet=args.quiet)
    return 0


# ----------------------------------------------------------------------------------- card, push
def _register_card(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "card",
        help="(Re)generate the model card of a local merge result.",
        description="Write README.md (and accuracy.png when evaluated) in DIR from its merge state, recipe and results.",
    )
    parser.add_argument("dir", metavar="DIR", help="A merge result folder.")
    parser.add_argument("--repo-id", metavar="USER/NAME", help="Repo id the usage snippet loads (default: the recipe's push_to_hub).")
    parser.add_argument("--space", metavar="USER/NAME", help="Link this Space from the card.")
    add_verbosity_flags(parser)
    parser.set_defaults(func=run_card)


def run_card(args: argparse.Namespace) -> int:
    _apply_quiet(args)
    from hf_merge.api import card

    path = card(args.dir, repo_id=args.repo_id, space=args.space)
    print(path)
    return 0


def _register_push(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "push",
        help="Push a local merge result to the Hub (also the retry after a failed push).",
        description="Upload DIR (weights, config, processor, card, recipe, merge state, results) as one commit.",
    )
    parser.add_argument("dir", metavar="DIR", help="A merge result folder.")
    parser.add_argument("--repo-id", required=True, metavar="USER/NAME", help="Model repo to push to (created if missing).")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--create-pr", action="store_true", help="Push as a pull request.")
    parser.add_argument("--commit-message", help="Commit summary.")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login). Never printed or saved.")
    add_verbosity_flags(parser)
    parser.set_defaults(func=run_push)


def run_push(args: argparse.Namespace) -> int:
    _apply_quiet(args)
    from hf_merge.api import push

    url = push(args.dir, args.repo_id, token=args.token, private=args.private, create_pr=args.create_pr,
               commit_message=args.commit_message)
    print(f"pushed: {url}")
    return 0


# ----------------------------------------------------------------------------------- output
def _apply_quiet(args: argparse.Namespace) -> None:
    """``--quiet`` silences the Hub client's download and upload bars too (it may be imported already)."""
    if getattr(args, "quiet", False):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def _print_summary(result: Any, *, quiet: bool) -> None:
    """A short table of what was merged, then where the result is."""
    if not result.is_main_process:
        return
    if not quiet:
        rows = [("step", "expert", "commit", "avg acc")]
        for entry, accuracy in zip(result.steps, result.accuracy or [None] * len(result.steps), strict=False):
            sha = (entry.get("commit_sha") or "local")[:10]
            rows.append((str(entry.get("step")), str(entry.get("name") or entry.get("repo_id")), sha,
                         f"{100 * accuracy:.1f}" if accuracy is not None else "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())
    print(f"output: {result.output_dir}")
    if result.commit_url:
        print(f"pushed: {result.commit_url}")
    if result.space_url:
        print(f"space: {result.space_url}")
