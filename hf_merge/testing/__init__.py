"""What tests, the offline quick start and air-gapped teams share: a local Hub server and tiny models.

Nothing here is imported by ``hf_merge`` itself; import the submodules directly, e.g.
``from hf_merge.testing.hub_server import LocalHubServer``.
"""
