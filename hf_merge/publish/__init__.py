"""What a person reads of a merge: the model card and its accuracy table and plot, and the Gradio
Space.

May import :mod:`hf_merge.evaluation`, :mod:`hf_merge.merging`, :mod:`hf_merge.hub`,
:mod:`hf_merge.io` and the ground floor; never the watcher or the API.
"""
