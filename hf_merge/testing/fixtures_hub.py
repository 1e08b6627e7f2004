"""pytest plugin: a local Hub server for the whole test session, and who may write to it.

Enable with ``pytest_plugins = ["hf_merge.testing.fixtures_hub"]`` in a ``conftest.py`` that has set
``HF_ENDPOINT=http://127.0.0.1:<free port>`` before ``huggingface_hub`` was imported: the server
listens on that port, so code that uses the default endpoint (``transformers``' ``push_to_hub`` and
``from_pretrained``, subprocesses) reaches it too. Users ``alice``, ``bob`` and ``carol`` have tokens,
and so does ``SFconvertbot`` (the Hub's conversion bot's name: its pull requests are opened through
the API like anyone's).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from hf_merge.hub_server import LocalHubServer

ALICE = "alice"
BOB = "bob"
CAROL = "carol"
CONVERSION_BOT = "SFconvertbot"


def _endpoint_port() -> int:
    """The port of a local ``HF_ENDPOINT``, or 0 (any free port) when it points elsewhere."""
    parts = urlsplit(os.environ.get("HF_ENDPOINT", ""))
    if parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost") and parts.port:
        return parts.port
    return 0


@pytest.fixture(scope="session")
def hub_tokens() -> dict[str, str]:
    """User name -> token of every user of the session's Hub."""
    return {ALICE: f"hf_alice_{secrets.token_hex(12)}", BOB: f"hf_bob_{secrets.token_hex(12)}",
            CAROL: f"hf_carol_{secrets.token_hex(12)}", CONVERSION_BOT: f"hf_bot_{secrets.token_hex(12)}"}


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory, hub_tokens) -> Iterator[LocalHubServer]:
    """The session's :class:`LocalHubServer` (temporary root), on ``HF_ENDPOINT``'s port."""
    server = LocalHubServer(tmp_path_factory.mktemp("hub-root"), port=_endpoint_port(), tokens=hub_tokens)
    with server:
        yield server


@pytest.fixture(scope="session")
def hub_url(hub_server) -> str:
    """Base URL of the session's Hub (equal to ``HF_ENDPOINT`` when that is local)."""
    return hub_server.url


@pytest.fixture(scope="session")
def alice_token(hub_tokens) -> str:
    """Token of ``alice``, who owns the seeded repos."""
    return hub_tokens[ALICE]


@pytest.fixture(scope="session")
def bob_token(hub_tokens) -> str:
    """Token of ``bob``, a second user (for access-control tests)."""
    return hub_tokens[BOB]


@pytest.fixture(scope="session")
def carol_token(hub_tokens) -> str:
    """Token of ``carol``, who pushes fine-tunes that watchers pick up (her own namespace keeps
    other tests' listings of ``bob`` unchanged)."""
    return hub_tokens[CAROL]


@pytest.fixture(scope="session")
def conversion_bot_token(hub_tokens) -> str:
    """Token of ``SFconvertbot``, who opens safetensors conversion pull requests."""
    return hub_tokens[CONVERSION_BOT]


@pytest.fixture(scope="session")
def hub_api(hub_url, alice_token):
    """``HfApi`` on the session's Hub, authenticated as ``alice``."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_url, token=alice_token)
