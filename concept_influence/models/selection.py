"""Which linear maps are tracked: :class:`MapSelection`, one object for the API (``adapter.linear_maps(select=...)``,
``curvature.resolve_maps``), the run config (``[model] track``) and the command line (``plan --track``).

A selection keeps the maps that pass every criterion it gives (criteria left empty keep everything):

* ``kinds``: ``"attention"`` and/or ``"mlp"``, read from the map's name (:func:`map_kind`): TransformerLens
  ``blocks.{l}.attn.W_Q/W_K/W_V/W_O`` are attention and ``blocks.{l}.mlp.W_in/W_out`` MLP; Hugging Face maps are
  named ``blocks.{l}.<module path>`` and their kind is the block's child they sit in (``self_attn.q_proj``,
  ``attn.c_attn`` are attention; ``mlp.gate_proj``, ``mlp.c_fc`` are MLP), LoRA factors
  (``self_attn.q_proj.lora_A.default``) included;
* ``names``: shell-style globs (:mod:`fnmatch`) on the full map name, any of which may match
  (``"*.q_proj*"``, ``"blocks.*.mlp.*"``);
* ``blocks``: block indices, as ``"0-3"``, ``"0-3,6"``, an integer, or a list of both (``[0, "4-5"]``).

A criterion that matches no map of the model (a kind the model lacks, a glob that matches nothing, a block beyond its
last) is a :class:`MapSelectionError` naming it, and so is a selection whose criteria together leave nothing.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..errors import ConceptInfluenceError

__all__ = ["MapSelection", "MapSelectionError", "MAP_KINDS", "map_kind", "parse_blocks", "selected_maps", "checked_selection"]

#: The kinds of linear map a selection can name.
MAP_KINDS = ("attention", "mlp")

_KIND_OF_CHILD = {"attn": "attention", "self_attn": "attention", "attention": "attention", "self_attention": "attention",
                  "mlp": "mlp", "feed_forward": "mlp", "ffn": "mlp", "block_sparse_moe": "mlp"}


class MapSelectionError(ConceptInfluenceError, ValueError):
    """A selection of linear maps is malformed or selects nothing; the message names the criterion."""


def map_kind(name: str) -> str | None:
    """``"attention"``, ``"mlp"`` or None (neither) for a map named ``blocks.{l}.<child>...``."""
    parts = name.split(".")
    child = parts[2] if len(parts) > 2 and parts[0] == "blocks" else parts[0]
    return _KIND_OF_CHILD.get(child)


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_blocks(spec: Any) -> tuple[int, ...]:
    """Block indices from ``"0-3"``, ``"0-3,6"``, an int, or a list of ints and such strings; sorted, unique."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise MapSelectionError(f"blocks: expected an index, a range such as \"0-3\" or a list of them, got {item!r}")
        if isinstance(item, int):
            if item < 0:
                raise MapSelectionError(f"blocks: a block index is >= 0, got {item}")
            out.add(item)
            continue
        for part in item.split(","):
            m = _RANGE.match(part)
            if not m:
                raise MapSelectionError(f"blocks: cannot read {part.strip()!r} (expected an index or a range such as "
                                        "\"0-3\")")
            lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            if hi < lo:
                raise MapSelectionError(f"blocks: the range {part.strip()!r} is empty (end before start)")
            out.update(range(lo, hi + 1))
    if not out:
        raise MapSelectionError("blocks: an empty list selects no block")
    return tuple(sorted(out))


def _blocks_text(blocks: Sequence[int]) -> str:
    """``(0, 1, 2, 3, 6)`` as ``"0-3,6"``."""
    runs, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            runs.append(str(start) if start == b else f"{start}-{b}")
            start = None
    return ",".join(runs)


def _strings(value: Any, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) and x for x in items):
        raise MapSelectionError(f"{key}: expected a string or a list of strings, got {value!r}")
    return tuple(items)


@dataclass(frozen=True)
class MapSelection:
    """The tracked maps: those of ``kinds`` (empty: any), matching one of the ``names`` globs (empty: any), in
    ``blocks`` (None: any). ``MapSelection()`` keeps every map. See the module docstring for the forms."""

    kinds: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        kinds = _strings(self.kinds, "kinds") if self.kinds else ()
        bad = [k for k in kinds if k not in MAP_KINDS]
        if bad:
            raise MapSelectionError(f"kinds: unknown kind {bad[0]!r}; expected some of {', '.join(MAP_KINDS)}")
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(kinds)))
        object.__setattr__(self, "names", _strings(self.names, "names") if self.names else ())
        if self.blocks is not None:
            object.__setattr__(self, "blocks", parse_blocks(self.blocks))

    @classmethod
    def parse(cls, value: "MapSelection | dict | str | None") -> "MapSelection":
        """A selection from its dict form (``{"kinds": ..., "names": ..., "blocks": ...}``; other keys are an error),
        a kind (``"mlp"``), a name glob, or None (everything)."""
        if value is None:
            return cls()
        if isinstance(value, MapSelection):
            return value
        if isinstance(value, str):
            return cls(kinds=(value,)) if value in MAP_KINDS else cls(names=(value,))
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"kinds", "names", "blocks"})
            if unknown:
                raise MapSelectionError(f"unknown key {unknown[0]!r} in a map selection (known: kinds, names, blocks)")
            return cls(kinds=value.get("kinds") or (), names=value.get("names") or (), blocks=value.get("blocks"))
        raise MapSelectionError(f"a map selection is a kind, a name glob or a table of kinds, names and blocks; got "
                                f"{type(value).__name__}")

    @property
    def is_everything(self) -> bool:
        return not self.kinds and not self.names and self.blocks is None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form :meth:`parse` reads back (only the criteria given)."""
        out: dict[str, Any] = {}
        if self.kinds:
            out["kinds"] = list(self.kinds)
        if self.names:
            out["names"] = list(self.names)
        if self.blocks is not None:
            out["blocks"] = _blocks_text(self.blocks)
        return out

    def describe(self) -> str:
        """``kinds=mlp, blocks=0-3`` (or ``every map``)."""
        parts = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in self.to_dict().items()]
        return ", ".join(parts) or "every map"

    def keeps(self, name: str, block: int) -> bool:
        return ((not self.kinds or map_kind(name) in self.kinds)
                and (not self.names or any(fnmatch.fnmatchcase(name, g) for g in self.names))
                and (self.blocks is None or block in self.blocks))

    def apply(self, maps: Sequence, every: Sequence | None = None, n_blocks: int | None = None,
              where: str = "") -> list:
        """The maps of ``maps`` this selection keeps, in order. Each criterion is checked against ``every`` (default
        ``maps``: the model's maps before any other limit, such as the concept's block): one that matches none of
        them, or a selection that keeps none of ``maps``, is a :class:`MapSelectionError` (``where`` says which
        limit ``maps`` is under, for the message)."""
        if self.is_everything:
            return list(maps)
        every = list(maps if every is None else every)
        self.check(every, n_blocks)
        kept = [m for m in maps if self.keeps(m.name, m.block)]
        if not kept:
            examples = ", ".join(m.name for m in list(maps)[:3]) or "none"
            raise MapSelectionError(f"the map selection ({self.describe()}) keeps none of the {len(maps)} linear maps"
                                    f"{where} (e.g. {examples})")
        return kept

    def check(self, every: Iterable, n_blocks: int | None = None) -> None:
        """Raise :class:`MapSelectionError` naming the first criterion that matches none of the maps ``every``."""
        every = list(every)
        present = {map_kind(m.name) for m in every}
        for kind in self.kinds:
            if kind not in present:
                raise MapSelectionError(f"kinds: no {kind} map in the model (its maps are e.g. "
                                        f"{', '.join(m.name for m in every[:3])})")
        for glob in self.names:
            if not any(fnmatch.fnmatchcase(m.name, glob) for m in every):
                raise MapSelectionError(f"names: the glob {glob!r} matches no linear map (they are named like "
                                        f"{', '.join(m.name for m in every[:4])})")
        if self.blocks is not None:
            have = {m.block for m in every}
            missing = [b for b in self.blocks if b not in have]
            if missing:
                last = n_blocks - 1 if n_blocks else max(have, default=-1)
                which = f"block {missing[0]} has" if len(missing) == 1 else f"blocks {_blocks_text(missing)} have"
                raise MapSelectionError(f"blocks: {which} no linear map (the model's blocks are 0..{last})")
        kept = [m for m in every if self.keeps(m.name, m.block)]
        if not kept:
            raise MapSelectionError(f"the map selection ({self.describe()}) matches each criterion somewhere but no "
                                    "map passes all of them together")


def selected_maps(adapter, max_block: int | None, select: "MapSelection | dict | str | None") -> list:
    """``adapter``'s linear maps of blocks ``0..max_block`` (None: all) that ``select`` keeps (a :class:`MapSelection`
    or its dict / kind / glob form; None: every map). A selection that keeps nothing, or one of whose criteria matches
    no map of the model, is a :class:`MapSelectionError` naming it."""
    maps = adapter._linear_maps(max_block)
    selection = MapSelection.parse(select)
    if selection.is_everything:
        return maps
    where = "" if max_block is None else f" of blocks 0..{max_block}"
    return selection.apply(maps, adapter._linear_maps() if max_block is not None else maps, adapter.n_blocks, where)


def checked_selection(adapter, select: "MapSelection | dict | str | None") -> "MapSelection | None":
    """``select`` as a :class:`MapSelection` checked against ``adapter``'s maps (None when it keeps every map)."""
    selection = MapSelection.parse(select)
    if selection.is_everything:
        return None
    selection.apply(adapter._linear_maps(), n_blocks=adapter.n_blocks)
    return selection
