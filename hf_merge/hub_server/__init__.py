"""A local, Hub-compatible server: ``hf-merge hub serve``, the demo, the tests, air-gapped teams.

It speaks the Hub's HTTP API as ``huggingface_hub``, ``transformers`` and ``datasets`` use it.
One layer a file: :mod:`~hf_merge.hub_server.storage` (repos, commits and refs on disk,
content-addressed), :mod:`~hf_merge.hub_server.git` (git blob and LFS pointer details),
:mod:`~hf_merge.hub_server.metadata` (what the API shows of a repo: cards, tags, trees),
:mod:`~hf_merge.hub_server.routes` (one method per endpoint), :mod:`~hf_merge.hub_server.request`
(one parsed request), :mod:`~hf_merge.hub_server.throttle` (bandwidth limit, byte count) and
:mod:`~hf_merge.hub_server.server` (HTTP dispatch, streamed bodies, the server's life cycle).
"""

from hf_merge.hub_server.server import LocalHubServer, serve

__all__ = ["LocalHubServer", "serve"]
