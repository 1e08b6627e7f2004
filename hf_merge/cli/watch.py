"""``hf-merge watch``: keep a merged repo up to date (poll, ``--once``, ``--webhook``), and its Space."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hf_merge.cli import add_verbosity_flags
from hf_merge.errors import UsageError


def register(subparsers) -> None:
    """Add ``watch`` to the ``hf-merge`` parser (and the ``watch:`` section to every recipe read)."""
    # The watcher's recipe and card sections: any command may read a recipe or write a card with them.
    import hf_merge.watch.ledger  # noqa: F401
    import hf_merge.watch.policy  # noqa: F401

    parser = subparsers.add_parser(
        "watch",
        help="Merge new fine-tunes of a merged repo's base as they appear (poll, --once, or --webhook).",
        description="hf-merge watch MERGED_REPO [options]  |  hf-merge watch publish-space MERGED_REPO --space USER/NAME",
    )
    parser.add_argument("merged_repo", metavar="MERGED_REPO", help="Repo id of a model made by hf-merge (or `publish-space`).")
    parser.add_argument("space_repo", nargs="?", metavar="MERGED_REPO", help=argparse.SUPPRESS)
    parser.add_argument("--once", action="store_true", help="One pass, then exit (cron, CI).")
    parser.add_argument("--interval", type=float, default=300.0, metavar="SECONDS", help="Seconds between passes (default: 300).")
    parser.add_argument("--author", action="append", default=[], metavar="USER", help="Also consider every model of USER (repeatable).")
    parser.add_argument("--search", action="append", default=[], metavar="TEXT", help="Also consider models whose id contains TEXT (repeatable).")
    parser.add_argument("--allow-list", metavar="FILE", help="Also consider the REPO[@REV] listed in FILE, one per line.")
    parser.add_argument("--policy", metavar="FILE", help="Admission policy: a YAML file with a `watch:` section (default: the repo's recipe).")
    parser.add_argument("--review", choices=("commit", "pr"), default="commit", help="Push each merge as a commit (default) or a pull request.")
    parser.add_argument("--work-dir", metavar="DIR", help="Watcher state (default: ~/.cache/hf-merge/watch/USER--NAME).")
    parser.add_argument("--limit", type=int, default=100, help="Models per Hub query, newest first (default: 100).")
    parser.add_argument("--webhook", action="store_true", help="Serve POST /webhooks/watch for the Hub's webhooks instead of polling.")
    parser.add_argument("--webhook-secret", help="The webhook's secret (default: WEBHOOK_SECRET).")
    parser.add_argument("--host", default="127.0.0.1", help="Webhook server interface (default: 127.0.0.1).")
    parser.add_argument("--port", type=int, default=7860, help="Webhook server port (default: 7860).")
    parser.add_argument("--space", metavar="USER/NAME", help="With publish-space: the Space to create.")
    parser.add_argument("--private", action="store_true", help="With publish-space: create the Space private.")
    parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the stored login).")
    add_verbosity_flags(parser)
    parser.set_defaults(func=run_watch)


def run_watch(args: argparse.Namespace) -> int:
    from hf_merge.watch.policy import load_policy_file

    policy = load_policy_file(args.policy) if args.policy else None
    if args.merged_repo == "publish-space":
        if not args.space_repo or not args.space:
            raise UsageError("usage: hf-merge watch publish-space MERGED_REPO --space USER/NAME")
        from hf_merge.watch.space import publish_watcher_space

        print(publish_watcher_space(args.space_repo, args.space, token=args.token, private=args.private, policy=policy))
        return 0
    if args.space_repo:
        raise UsageError(f"unexpected argument {args.space_repo!r}; did you mean `hf-merge watch publish-space`?")
    if args.interval <= 0:
        raise UsageError("--interval must be a positive number of seconds")
    from hf_merge.watch.runner import Watcher

    work_dir = Path(args.work_dir) if args.work_dir else Path("~/.cache/hf-merge/watch").expanduser() / args.merged_repo.replace("/", "--")
    watcher = Watcher(args.merged_repo, work_dir=work_dir, token=args.token, policy=policy, review=args.review,
                      authors=args.author, searches=args.search, allow_list=args.allow_list, limit=args.limit)
    if args.webhook:
        from hf_merge.watch.webhook import serve_webhooks

        serve_webhooks(watcher, secret=args.webhook_secret or os.environ.get("WEBHOOK_SECRET"), host=args.host, port=args.port)
        return 0
    if args.once:
        for outcome in watcher.run_once():
            detail = outcome.url or outcome.reason or ""
            print(f"{outcome.status} {outcome.key}" + (f": {detail}" if detail else ""))
        return 0
    watcher.watch(args.interval)
    return 0
