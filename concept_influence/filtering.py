"""Closing the loop: remove the top of a ranking from a training file.

:func:`removal_indices` is the one rule (used by the benchmarks' filter-and-retrain as well);
:func:`filter_training_file` applies it to a training file (any that :func:`~concept_influence.data.read_chats`
reads) and a scores file, writes the kept records unchanged and a sidecar (``<out>.filter.json``) that records
what was removed and why.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .data import write_kept
from .errors import ConceptInfluenceError
from .fileio import atomic_write, atomic_write_text, file_sha256, path_sha256
from .scores import Scores

__all__ = ["FilterError", "removal_indices", "filter_training_file", "sidecar_path"]


class FilterError(ConceptInfluenceError, ValueError):
    """A filter that cannot be applied as asked; the message names the file or the option."""


def _count(amount: float, n: int, option: str) -> int:
    """A count from a fraction in (0, 1) or a whole number in [0, n]."""
    if isinstance(amount, bool) or not np.isfinite(amount) or amount < 0:
        raise FilterError(f"{option} must be a fraction in (0, 1) or a count >= 0, got {amount!r}")
    if 0 < amount < 1:
        return round(amount * n)
    if float(amount) != int(amount):
        raise FilterError(f"{option} must be a fraction in (0, 1) or a whole count, got {amount!r}")
    if amount > n:
        raise FilterError(f"{option} {int(amount)} is more than the {n} scored examples")
    return int(amount)


def removal_indices(values, *, remove_top: float | None = None, keep_bottom: float | None = None) -> np.ndarray:
    """Positions of the examples to remove, highest score first (ties keep data order).

    ``remove_top``: a fraction in (0, 1) or a count of the highest-scored examples to remove;
    ``keep_bottom``: a fraction or a count of the lowest-scored examples to keep (everything else is removed).
    Exactly one of the two must be given."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1:
        raise FilterError(f"expected one score per example, got an array of shape {values.shape}")
    if not np.isfinite(values).all():
        raise FilterError(f"{int((~np.isfinite(values)).sum())} scores are not finite")
    if (remove_top is None) == (keep_bottom is None):
        raise FilterError("give exactly one of remove_top (--remove-top) and keep_bottom (--keep-bottom)")
    n = len(values)
    order = np.argsort(-values, kind="stable")
    if remove_top is not None:
        return order[: _count(remove_top, n, "remove_top")]
    return order[: n - _count(keep_bottom, n, "keep_bottom")]


def filter_training_file(scores: Scores | str | Path, data: str | Path, out: str | Path, *,
                         remove_top: float | None = None, keep_bottom: float | None = None,
                         column: int | str = 0, overwrite: bool = False) -> dict:
    """Write ``out``: the records of the training file ``data`` minus the top of the ranking in ``scores``
    (a :class:`Scores` or the path of a saved scores file); and ``<out>.filter.json``, the record of what was
    removed (ids, scores, ranks), why (estimator, column, rule) and from which inputs (SHA-256).

    ``out``'s name picks its format (:func:`~concept_influence.data.write_kept`): a JSONL ``data`` gives its lines
    byte for byte (gzipped when ``out`` ends in ``.gz``); a Parquet, Arrow or saved-dataset ``data`` gives every
    column of the kept rows as ``.parquet`` or ``.arrow``, or their chat columns as JSONL for any other name.

    Every scored id must be an example of ``data`` (ids are ``<file name>:<line>`` or ``<name>:<row>``); examples without a score
    (e.g. skipped at scoring because their response did not fit) are kept and counted. An existing ``out`` is
    never replaced unless ``overwrite``. Returns the record."""
    if not isinstance(data, (str, Path)):
        raise FilterError(f"data must be the path of the scored training file, got a {type(data).__name__} (filter a "
                          "datasets.Dataset with its select method on the rows whose id is kept)")
    data, out = Path(data), Path(out)
    scores_path = None
    if not isinstance(scores, Scores):
        scores_path = Path(scores)
        try:
            scores = Scores.load(scores_path)
        except (OSError, ValueError, KeyError) as e:
            raise FilterError(f"{scores_path}: cannot read scores ({e})") from None
    if out.resolve() == data.resolve():
        raise FilterError(f"{out}: the output would replace the training file; write the filtered file elsewhere")
    if out.exists() and not overwrite:
        raise FilterError(f"{out} exists; choose another output or allow overwriting (--force)")
    try:
        col = scores.column_index(column)
        values = scores.column(col)
    except (ValueError, IndexError):
        raise FilterError(f"scores have no column {column!r}; columns: {', '.join(scores.columns)}") from None
    drop = removal_indices(values, remove_top=remove_top, keep_bottom=keep_bottom)
    removed_ids = [scores.ids[i] for i in drop]
    removed = set(removed_ids)

    seen: set[str] = set()
    kept = 0

    def write(tmp: str) -> None:  # streamed: one line or one chunk of rows in memory at a time
        nonlocal seen, kept
        ids, kept = write_kept(data, tmp, lambda i: i not in removed, name=out.name)
        seen = set(ids)
        unknown = [i for i in scores.ids if i not in seen]
        if unknown:  # raised inside the atomic write: the temporary file is removed, `out` is never created
            raise FilterError(f"the scores do not match {data}: {len(unknown)} of {len(scores.ids)} scored ids are "
                              f"not examples of it (first: {unknown[0]!r}); score this file, or filter the file that "
                              "was scored")

    atomic_write(out, write)
    record = {
        "filtered_file": str(out), "source": {"path": str(data), "sha256": path_sha256(data)},
        "scores": {"path": str(scores_path) if scores_path else None,
                   "sha256": file_sha256(scores_path) if scores_path else None,
                   "estimator": scores.estimator, "column": scores.columns[col], "metadata": scores.metadata},
        "rule": {"remove_top": remove_top} if remove_top is not None else {"keep_bottom": keep_bottom},
        "examples": len(seen), "scored": len(scores.ids), "unscored_kept": len(seen) - len(scores.ids),
        "removed": len(drop), "kept": kept,
        # removal_indices returns the top of the ranking in order, so an example's rank is its position there
        "removed_examples": [{"id": scores.ids[i], "score": float(values[i]), "rank": r}
                             for r, i in enumerate(drop.tolist(), start=1)],
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(sidecar_path(out), json.dumps(record, indent=1) + "\n")
    return record


def sidecar_path(out: str | Path) -> Path:
    """Where :func:`filter_training_file` records what it removed: ``<out>.filter.json``."""
    out = Path(out)
    return out.with_name(out.name + ".filter.json")

