"""``hf-merge hub serve``: a local Hub-compatible server, for offline and air-gapped use.

Point clients at it with ``HF_ENDPOINT=http://HOST:PORT`` and ``HF_HUB_DISABLE_XET=1`` (the server
speaks Git LFS, not Xet), and log in with one of the ``--token`` secrets (``HF_TOKEN=SECRET``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_merge.errors import UsageError


def register(subparsers) -> None:
    """Add this group's subcommands to the ``hf-merge`` parser."""
    from hf_merge.cli import add_verbosity_flags

    hub = subparsers.add_parser("hub", help="Run a local Hugging Face Hub-compatible server.")
    hub_commands = hub.add_subparsers(dest="hub_command", metavar="HUB_COMMAND")
    serve = hub_commands.add_parser(
        "serve",
        help="Serve repos stored under --root over HTTP (models, datasets, Spaces).",
        description=(
            "Serve a Hub-compatible API for huggingface_hub and transformers. Clients set "
            "HF_ENDPOINT=http://HOST:PORT and HF_HUB_DISABLE_XET=1. Data persists under --root."
        ),
    )
    serve.add_argument("--root", type=Path, required=True, help="Folder holding the repos (created if missing).")
    serve.add_argument("--host", default="127.0.0.1", help="Interface to listen on (default: 127.0.0.1).")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one).")
    serve.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="NAME=SECRET",
        help="A user and the token it authenticates with; repeat for several users.",
    )
    serve.add_argument(
        "--token-file",
        type=Path,
        help="File of NAME=SECRET lines (keeps secrets off the command line and out of `ps`).",
    )
    serve.add_argument(
        "--bandwidth",
        metavar="RATE",
        help="Limit downloads to RATE per second over all clients (e.g. 20MB, 500KiB): a slow link for benchmarks.",
    )
    add_verbosity_flags(serve)
    serve.set_defaults(func=_serve)
    hub.set_defaults(func=lambda args: _print_help(hub))


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def parse_tokens(pairs: list[str], token_file: Path | None = None) -> dict[str, str]:
    """``["alice=SECRET", ...]`` (and lines of ``token_file``) -> ``{"alice": "SECRET"}``."""
    lines = list(pairs)
    if token_file is not None:
        try:
            lines += [line.strip() for line in token_file.read_text().splitlines()]
        except OSError as error:
            raise UsageError(f"Cannot read --token-file {token_file}: {error.strerror}.") from error
    tokens: dict[str, str] = {}
    for line in lines:
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition("=")
        if not sep or not name.strip() or not secret.strip():
            # Never echo the value: it may hold a secret.
            raise UsageError("Each token must look like NAME=SECRET (a user name and a non-empty secret).")
        if name.strip() in tokens:
            raise UsageError(f"User '{name.strip()}' has more than one token.")
        tokens[name.strip()] = secret.strip()
    if len(set(tokens.values())) != len(tokens):
        raise UsageError("Two users cannot share a token.")
    return tokens


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_rate(text: str) -> float:
    """``"20MB"``, ``"20MB/s"``, ``"500KiB"``, ``"1000"`` -> bytes per second."""
    value = text.strip().upper().removesuffix("/S").replace(" ", "")
    number = value.rstrip("KMGIB")
    unit = value[len(number):]
    try:
        rate = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise UsageError(f"--bandwidth {text!r} is not a rate; write e.g. 20MB or 500KiB (per second)") from None
    if rate <= 0:
        raise UsageError(f"--bandwidth must be positive, got {text!r}")
    return rate


def _serve(args: argparse.Namespace) -> int:
    from hf_merge.hub_server import LocalHubServer

    tokens = parse_tokens(args.token, args.token_file)
    rate = parse_rate(args.bandwidth) if args.bandwidth else None
    try:
        server = LocalHubServer(args.root, host=args.host, port=args.port, tokens=tokens, bandwidth_bytes_per_s=rate)
    except OSError as error:
        raise UsageError(f"Cannot listen on {args.host}:{args.port}: {error.strerror}.") from error
    users = ", ".join(sorted(tokens)) or "none (read-only)"
    print(f"Local Hub at {server.url} (data in {args.root}; users: {users})", flush=True)
    print(f"Clients: export HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("Local Hub stopped.", flush=True)
    return 0
