"""``hf-merge space publish`` and ``hf-merge space run``: the Gradio Space of a merged model."""

from __future__ import annotations

import argparse

from hf_merge.cli import add_verbosity_flags


def register(subparsers) -> None:
    """Add the ``space`` group of subcommands to the ``hf-merge`` parser."""
    parser = subparsers.add_parser("space", help="Publish or run the Gradio Space of a merged model.")
    commands = parser.add_subparsers(dest="space_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    publish = commands.add_parser(
        "publish",
        help="Create or update a Gradio Space for a merged model on the Hub and link it from the model card.",
    )
    publish.add_argument("merged_repo", metavar="MERGED_REPO", help="Repo id of the merged model (USER/NAME).")
    publish.add_argument("--space", metavar="USER/NAME", help="Space to create (default: same id as the model).")
    publish.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the stored login).")
    publish.add_argument("--private", action="store_true", help="Create the Space private.")
    publish.add_argument("--no-card-link", action="store_true", help="Leave the model card unchanged.")
    add_verbosity_flags(publish)
    publish.set_defaults(func=run_publish)

    run = commands.add_parser("run", help="Serve the Space of a merged model (repo id or local folder) locally.")
    run.add_argument("repo", metavar="REPO", help="Repo id of a merged model, or a local merge output folder.")
    run.add_argument("--host", default="127.0.0.1", help="Interface to listen on (default: 127.0.0.1).")
    run.add_argument("--port", type=int, default=7860, help="Port (default: 7860).")
    run.add_argument("--token", help="Hub token for a private model (default: HF_TOKEN or the stored login).")
    add_verbosity_flags(run)
    run.set_defaults(func=run_serve)


def run_publish(args: argparse.Namespace) -> int:
    from hf_merge.publish.space import publish_space

    url = publish_space(
        args.merged_repo, args.space, token=args.token, private=args.private, link_card=not args.no_card_link
    )
    print(url)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from hf_merge.publish.space import run_space

    run_space(args.repo, host=args.host, port=args.port, token=args.token)
    return 0
