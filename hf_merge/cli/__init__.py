"""The ``hf-merge`` command line: argument parsing only; all work is done by the Python API.

Each module of this package registers one group of subcommands. Errors of type
:class:`hf_merge.errors.HfMergeError` become one line on stderr and the error's exit code
(2 for usage, 1 for run time). Installed with ``hf extensions install OWNER/hf-merge``, the console
script ``hf-merge`` is also an ``hf`` CLI extension: ``hf merge ...``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from hf_merge.errors import HfMergeError
from hf_merge.log import set_verbosity

# One module per group of subcommands; each defines ``register(subparsers)``.
_COMMAND_MODULES = ("merge", "evaluate", "space", "hub", "demo", "watch")


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="hf-merge",
        description="Merge fine-tuned CLIP models from the Hugging Face Hub as they arrive.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--verbose``, shared by every subcommand that does work."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="Only print errors and the final result.")
    group.add_argument("-v", "--verbose", action="store_true", help="Print debug logs.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    set_verbosity(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if quiet:
        import os

        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from hf_merge.progress import configure_client_bars

    configure_client_bars()
    try:
        return int(args.func(args) or 0)
    except HfMergeError as error:
        print(f"hf-merge: error: {one_line(str(error))}", file=sys.stderr)
        retry = getattr(error, "retry_command", None)
        if retry:
            print(f"hf-merge: retry with: {one_line(retry)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("hf-merge: interrupted", file=sys.stderr)
        return 130


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``): a value quoted from user input
    or from another repo cannot break an error over lines or send terminal escapes."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf-merge")
    except PackageNotFoundError:
        return "0+unknown"


if __name__ == "__main__":
    sys.exit(main())
