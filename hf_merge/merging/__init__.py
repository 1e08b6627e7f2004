"""The merge itself: the engine that streams experts through a method, the resumable merge state,
the per-step write transaction, the distribution of tensors over processes, and ``methods/``.

May import :mod:`hf_merge.hub`, :mod:`hf_merge.io` and the ground floor; never evaluation,
publishing or the watcher (the engine reports each step through callbacks instead).
"""
