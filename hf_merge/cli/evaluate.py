"""Placeholder: subcommands of this group are registered here."""


def register(subparsers) -> None:
    """Add this group's subcommands to the ``hf-merge`` parser."""
