"""The Hub client: resolve repo ids to pinned sources, preflight them, download (whole or by
ranges, one expert ahead), read conversion pull requests, and push.

May import :mod:`hf_merge.io` and the ground floor; it knows nothing of merging, evaluation or
the watcher. The same code runs against huggingface.co and the local Hub; only ``HF_ENDPOINT``
differs.
"""
