"""Per-example scores: ids, values (one column per concept), ranked views, save/load."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .fileio import atomic_write_text, load_tensors, save_tensors

__all__ = ["Scores"]

FORMAT_VERSION = 1


@dataclass
class Scores:
    """Scores of training examples. ``values`` is ``[N, K]`` (K concepts or queries, named by
    ``columns``); positive means training on the example pushes the measurement up.
    ``per_module`` optionally holds ``[N, K]`` contributions per linear map (they sum to ``values``);
    ``per_token`` optionally maps an id to its ``[n_tokens, K]`` token contributions."""

    ids: list[str]
    values: np.ndarray
    estimator: str
    columns: list[str] = field(default_factory=lambda: ["score"])
    metadata: dict = field(default_factory=dict)
    per_module: dict[str, np.ndarray] | None = None
    per_token: dict[str, np.ndarray] | None = None

    def __post_init__(self):
        values = np.asarray(self.values, dtype=np.float64)
        if values.ndim == 1:
            values = values[:, None]
        if values.shape != (len(self.ids), len(self.columns)):
            raise ValueError(f"values of shape {values.shape} do not match {len(self.ids)} ids x {len(self.columns)} columns")
        self.values = values

    def __len__(self) -> int:
        return len(self.ids)

    def column_index(self, which: int | str = 0) -> int:
        """The position of a column given by index or name."""
        return self.columns.index(which) if isinstance(which, str) else which

    def column(self, which: int | str = 0) -> np.ndarray:
        """One column of scores as a 1-D array (by index or name)."""
        return self.values[:, self.column_index(which)]

    def select(self, columns: Sequence[str], *, shares: bool = True, **changes) -> "Scores":
        """These ``columns`` (by name) as scores of their own, with their per-module and per-token shares (none when
        ``shares`` is false); ``changes`` replace other fields (``estimator``, ``metadata``)."""
        idx = [self.column_index(c) for c in columns]
        per_module = {k: v[:, idx] for k, v in self.per_module.items()} if shares and self.per_module else None
        per_token = {k: v[:, idx] for k, v in self.per_token.items()} if shares and self.per_token else None
        return replace(self, **{"values": self.values[:, idx], "columns": list(columns), "metadata": dict(self.metadata),
                                "per_module": per_module, "per_token": per_token, **changes})

    def ranked(self, which: int | str = 0) -> list[tuple[str, float]]:
        """``(id, score)`` pairs, highest first (ties keep file order)."""
        col = self.column(which)
        order = np.argsort(-col, kind="stable")
        return [(self.ids[i], float(col[i])) for i in order]

    def top(self, k: int = 10, which: int | str = 0) -> list[tuple[str, float]]:
        return self.ranked(which)[:k]

    def bottom(self, k: int = 10, which: int | str = 0) -> list[tuple[str, float]]:
        return self.ranked(which)[::-1][:k]

    def format_top(self, k: int = 10, texts: Mapping[str, str] | None = None, which: int | str = 0, width: int = 70) -> str:
        """A plain-text table of the top ``k`` examples, with their text when ``texts`` maps id -> text."""
        return _format_rows(self.top(k, which), texts, width)

    def format_bottom(self, k: int = 10, texts: Mapping[str, str] | None = None, which: int | str = 0,
                      width: int = 70) -> str:
        """The same table for the bottom ``k`` examples (lowest first)."""
        return _format_rows(self.bottom(k, which), texts, width)

    def aligned(self, ids: Sequence[str]) -> np.ndarray:
        """Values reordered to follow ``ids``; raises KeyError naming a missing id."""
        pos = {i: n for n, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise KeyError(f"{len(missing)} ids have no score (first: {missing[0]})")
        return self.values[[pos[i] for i in ids]]

    @classmethod
    def weighted_sum(cls, parts: Sequence["Scores"], weights: Sequence[float] | None = None,
                     estimator: str | None = None, metadata: dict | None = None) -> "Scores":
        """Σ wᵢ·partsᵢ (weights default to 1) of score sets over the same ids and columns, e.g. one estimator's
        scores at several checkpoints; per-module and per-token values are summed when every part has them. Ids
        or columns that differ are a ValueError naming the first difference."""
        if not parts:
            raise ValueError("weighted_sum needs at least one set of scores")
        weights = [1.0] * len(parts) if weights is None else [float(w) for w in weights]
        if len(weights) != len(parts):
            raise ValueError(f"{len(weights)} weights for {len(parts)} sets of scores")
        first = parts[0]
        for n, part in enumerate(parts[1:], start=2):
            if part.columns != first.columns:
                raise ValueError(f"scores {n} have columns {part.columns}, scores 1 have {first.columns}")
            if part.ids != first.ids:
                diff = next((i for i, (a, b) in enumerate(zip(part.ids, first.ids)) if a != b), min(len(part), len(first)))
                raise ValueError(f"scores {n} and scores 1 differ in their ids (from row {diff}; {len(part)} vs "
                                 f"{len(first)} rows)")

        def total(get) -> dict | None:
            found = [get(p) for p in parts]
            if any(f is None for f in found):
                return None
            return {k: sum(w * np.asarray(f[k]) for w, f in zip(weights, found)) for k in found[0]}

        return cls(list(first.ids), sum(w * p.values for w, p in zip(weights, parts)), estimator or first.estimator,
                   list(first.columns), metadata if metadata is not None else dict(first.metadata),
                   total(lambda p: p.per_module), total(lambda p: p.per_token))

    def save(self, path: str | Path) -> Path:
        """Save as ``<path>`` (safetensors: values, per-module and per-token values) plus a JSON sidecar (ids, metadata)."""
        path = Path(path)
        tensors = {"values": torch.from_numpy(self.values)}
        for name, v in (self.per_module or {}).items():
            tensors[f"module/{name}"] = torch.from_numpy(np.asarray(v, dtype=np.float64))
        for n, i in enumerate(self.ids if self.per_token else []):
            tensors[f"token/{n}"] = torch.from_numpy(np.asarray(self.per_token[i], dtype=np.float64))
        save_tensors(path, tensors)
        meta = {"format_version": FORMAT_VERSION, "estimator": self.estimator, "columns": self.columns,
                "ids": self.ids, "metadata": self.metadata}
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        """Load scores written by :meth:`save` (safetensors only; nothing is unpickled)."""
        path = Path(path)
        tensors = load_tensors(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: score format version {meta.get('format_version')} is not {FORMAT_VERSION}")
        per_module = {k[len("module/"):]: v.numpy() for k, v in tensors.items() if k.startswith("module/")} or None
        ids = meta["ids"]
        per_token = {ids[int(k[len("token/"):])]: v.numpy() for k, v in tensors.items() if k.startswith("token/")} or None
        return cls(ids, tensors["values"].numpy(), meta["estimator"], meta["columns"], meta["metadata"], per_module, per_token)


def _format_rows(rows: Sequence[tuple[str, float]], texts: Mapping[str, str] | None, width: int) -> str:
    lines = [f"{'rank':>4}  {'score':>11}  {'id':<24} text" if texts else f"{'rank':>4}  {'score':>11}  id"]
    for r, (i, s) in enumerate(rows, start=1):
        row = f"{r:>4}  {s:>11.4g}  {i:<24}"
        if texts:
            t = " ".join(texts.get(i, "").split())
            row += " " + (t if len(t) <= width else t[: width - 1] + "…")
        lines.append(row)
    return "\n".join(lines)
