"""``hf-merge watch``: keep a merged repo up to date as new fine-tunes of its base appear.

- :mod:`.discovery`: candidates from the Hub (``base_model:`` tags, authors, searches, an allow-list).
- :mod:`.policy`: the admission policy (the ``watch:`` section of a recipe) and its metadata checks.
- :mod:`.ledger`: the record of every candidate considered (``repo@sha`` -> merged / refused + reason).
- :mod:`.gate`: the quality gate (forgetting on the merged tasks, gain on the candidate's task).
- :mod:`.publish`: pushes of a watcher's results, retried with backoff.
- :mod:`.runner`: one pass (discover -> ledger -> policy -> merge -> gate -> push), and the poll loop.
- :mod:`.webhook`: the webhook mode, on ``huggingface_hub``'s ``WebhooksServer``.
- :mod:`.space`: the watcher deployed as a Space.

The watcher sits above the core: :mod:`.policy` registers the recipe's ``watch:`` section with
:func:`hf_merge.recipe.register_section`, so the core never imports the watcher.
"""
