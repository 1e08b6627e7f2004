"""pytest support: fixtures (a session-wide local Hub seeded with tiny models) and the tiny CLIP factory.

Only tests import this package; ``hf_merge`` itself never does (a test checks the import graph).
The local Hub server is :mod:`hf_merge.hub_server`, the offline model zoo :mod:`hf_merge.zoo`.
"""
