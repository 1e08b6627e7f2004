"""The one way hf-merge reads YAML: safe types only, a size cap, no aliases, short errors.

Every YAML hf-merge reads may come from someone else (a recipe, a policy file, a card's front
matter, the ``recipe.yaml`` of another person's merged repo), so each read is capped before it is
parsed and refuses aliases: a few hundred bytes of nested aliases (a "billion laughs") expand to
gigabytes once loaded, and a 100 MB file took 30 s to parse before its first unknown key was
reported. Nothing hf-merge writes uses anchors or aliases, so refusing them costs no real file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hf_merge.declared import excerpt
from hf_merge.errors import RecipeError

#: The largest YAML read (1 MiB): a recipe of a thousand experts is about 60 KB.
MAX_YAML_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses an alias where it would be composed (before any expansion)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            mark = event.start_mark
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise RecipeError(f"{self._source} uses a YAML alias *{excerpt(event.anchor, 40)[1:-1]}{where}; "
                              "aliases and anchors are not accepted: write the values out")
        return super().compose_node(parent, index)

    _source = "YAML"


def load_yaml(text: str | bytes, *, source: str) -> Any:
    """Parse ``text`` (safe types only); :class:`RecipeError` naming ``source`` when it is too large,
    uses aliases or is not valid YAML."""
    if len(text) > MAX_YAML_BYTES or (len(text) * 4 > MAX_YAML_BYTES and isinstance(text, str)
                                      and len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES):
        raise RecipeError(f"{source} is larger than {MAX_YAML_BYTES // (1 << 20)} MiB, the most hf-merge reads as YAML")
    loader = _NoAliasLoader(text)
    loader._source = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "invalid YAML"
        raise RecipeError(f"{source} is not valid YAML: {first[:EXCERPT_LINE]}") from None
    finally:
        loader.dispose()


EXCERPT_LINE = 120


def read_yaml(path: str | Path, *, source: str | None = None) -> Any:
    """Read and parse a YAML file, refusing one over :data:`MAX_YAML_BYTES` before reading it."""
    path = Path(path)
    name = source or path.name
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise RecipeError(f"{name} is {size / (1 << 20):.0f} MiB, larger than the {MAX_YAML_BYTES // (1 << 20)} MiB "
                          "hf-merge reads as YAML")
    return load_yaml(path.read_bytes(), source=name)
