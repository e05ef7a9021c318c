"""TransformerLens hook names: which block a hook belongs to."""

from __future__ import annotations

import re

__all__ = ["block_of_hook"]

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def block_of_hook(hook_name: str) -> int | None:
    """The block index in ``blocks.{l}.…``, or None for hooks outside the blocks."""
    m = _BLOCK_RE.match(hook_name)
    return int(m.group(1)) if m else None
