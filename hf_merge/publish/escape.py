"""Text from other people's repos, made inert before the model card shows it.

A card shows strings hf-merge does not control: licences and names from the parents' cards and
merge states, tensor names from their headers, task labels, refusal reasons quoting all of these.
Rendered by the Hub, a raw ``<script>``, ``<img onerror=...>``, a ``-->`` closing a hidden comment, a
``|`` splitting a table row or a ``[link](...)`` would be live. Every such string goes through one of
these functions on its way into ``README.md``; the YAML front matter is written by
``huggingface_hub.ModelCardData`` (a YAML dump), never by pasting strings.

The Space's ``app.py`` runs without hf-merge installed and carries a copy of :func:`markdown_text`
(a test keeps the two equal).
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

# Characters that start Markdown or HTML markup inside a line. `_` is left alone: inside a word
# (``clip-vit_b32``) it never starts emphasis, and repo names are full of it.
_MARKUP = re.compile(r"([\\`*\[\]|<>&])")
_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
_BACKTICKS = re.compile(r"`+")


def one_line(value: Any) -> str:
    """``str(value)`` with newlines, tabs and other control characters turned into spaces."""
    return "".join(char if char.isprintable() else " " for char in str(value))


def markdown_text(value: Any) -> str:
    """``value`` as literal text in Markdown prose or a table cell: HTML tags, links, emphasis,
    code and table pipes are escaped, and it stays on one line."""
    return _MARKUP.sub(lambda m: _ENTITIES.get(m.group(1), "\\" + m.group(1)), one_line(value))


def code_span(value: Any) -> str:
    """``value`` as an inline code span (shown verbatim; Markdown and HTML inside are inert)."""
    text = one_line(value)
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def code_block(text: str, language: str = "") -> str:
    """A fenced code block holding ``text`` verbatim: the fence is longer than any backtick run
    inside, so the content cannot close it early."""
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text if text.endswith("\n") else text + "\n"
    return f"{fence}{language}\n{body}{fence}"


def url_part(value: Any) -> str:
    """``value`` percent-encoded for a URL path (``/`` kept): no space, ``)`` or quote can end a link."""
    return quote(one_line(value), safe="/@")


def comment_json(data: Any) -> str:
    """``data`` as JSON that cannot end the HTML comment holding it (``<``, ``>`` and ``&`` are
    written as ``\\u003c``-style escapes, which JSON readers turn back into the characters)."""
    text = json.dumps(data)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
