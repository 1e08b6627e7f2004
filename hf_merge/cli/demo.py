"""``hf-merge demo``: the offline end-to-end demo (the README's main command)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add ``hf-merge demo`` to the parser."""
    parser = subparsers.add_parser(
        "demo",
        help="Offline end-to-end demo: build a small CLIP zoo, serve it from a local Hub, merge, evaluate, publish.",
        description="Build (or reuse) the offline model zoo, publish it on an embedded local Hub server, "
        "merge it by repo id with evaluation after every step, push the merged model with its card, "
        "and publish a Gradio Space next to it. Needs no internet.",
    )
    parser.add_argument("--output", "-o", default="demo-output", help="Folder for the local results (default: demo-output).")
    parser.add_argument("--method", default="tsv_m",
                        help="Merge method (default: tsv_m, the continual method that ranks first on the zoo's validation splits).")
    parser.add_argument("--no-tune", dest="tune", action="store_false",
                        help="Use the method's default scaling instead of choosing it at every step on the validation splits.")
    parser.add_argument("--eval-limit", type=int, default=500, help="Test examples per task (default: 500; 0 = all).")
    parser.add_argument("--port", type=int, default=0, help="Port of the local Hub (default: a free one).")
    parser.add_argument("--serve", action="store_true", help="Keep the Hub and the Space running until Ctrl-C.")
    parser.add_argument("--space-port", type=int, default=7860, help="Port of the Space with --serve (default: 7860).")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from hf_merge.demo import run_demo

    run_demo(args.output, method=args.method, tune=args.tune, eval_limit=args.eval_limit or None, port=args.port,
             serve=args.serve, space_port=args.space_port)
    return 0
