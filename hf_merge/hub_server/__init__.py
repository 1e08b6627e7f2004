"""A local, Hub-compatible server: ``hf-merge hub serve``, the demo, the tests, air-gapped teams.

It speaks the Hub's HTTP API as ``huggingface_hub``, ``transformers`` and ``datasets`` use it.
One layer a file: :mod:`~hf_merge.hub_server.objects` (content-addressed files, atomic writes,
garbage collection), :mod:`~hf_merge.hub_server.storage` (repos, commits and refs on disk),
:mod:`~hf_merge.hub_server.records` (what is stored about them), :mod:`~hf_merge.hub_server.git`
(git blob and LFS pointer details), :mod:`~hf_merge.hub_server.metadata` (what the API shows of a
repo: cards, tags, trees), :mod:`~hf_merge.hub_server.access` (who may read and write),
:mod:`~hf_merge.hub_server.routes` (one method per endpoint), :mod:`~hf_merge.hub_server.lfs`
(LFS batch and uploads), :mod:`~hf_merge.hub_server.discussions` (pull requests),
:mod:`~hf_merge.hub_server.webhooks`, :mod:`~hf_merge.hub_server.request` (one parsed request),
:mod:`~hf_merge.hub_server.limits` (body caps, timeouts, connections),
:mod:`~hf_merge.hub_server.throttle` (bandwidth limit, byte count),
:mod:`~hf_merge.hub_server.handler` (HTTP parsing and routing) and
:mod:`~hf_merge.hub_server.server` (the server's life cycle).
"""

from hf_merge.hub_server.server import LocalHubServer, serve

__all__ = ["LocalHubServer", "serve"]
