"""The concept × data map: for K concepts scored at once, which concepts each top example moves, and the top examples
of each concept, as a markdown report with a heatmap."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..fileio import atomic_write_text
from ..runs.report import markdown_rows
from ..scores import Scores

__all__ = ["ConceptMap", "concept_map", "write_concept_report"]


@dataclass
class ConceptMap:
    """``z`` ``[rows, K]``: the scores of the examples ``ids`` (the union of each concept's top ``top``) for each
    concept, in standard deviations over all scored examples; ``correlation`` ``[K, K]``: Spearman between the
    concepts' scores over all examples (concepts moved by the same data correlate)."""

    ids: list[str]
    columns: list[str]
    z: np.ndarray
    top: dict[str, list[tuple[str, float]]]
    correlation: np.ndarray

    def moves(self, row: int, threshold: float) -> list[str]:
        """The concepts example ``row`` pushes up by at least ``threshold`` standard deviations, strongest first."""
        order = np.argsort(-self.z[row], kind="stable")
        return [self.columns[k] for k in order if self.z[row, k] >= threshold]

    def to_markdown(self, texts: Mapping[str, tuple[str, str]] | None = None, threshold: float = 3.0) -> str:
        """The map as a table (one row per example: the concepts it moves by ≥ ``threshold`` sd, its largest z, its
        response), then each concept's top examples with their text."""
        texts = texts or {}
        lines = [f"| example | moves (≥ {threshold:g} sd) | max sd | response |", "|---|---|---:|---|"]
        for r, i in enumerate(self.ids):
            response = " ".join(texts.get(i, ("", ""))[1].split()).replace("|", "\\|")
            lines.append(f"| `{i}` | {', '.join(self.moves(r, threshold)) or '—'} | {self.z[r].max():.1f} | "
                         f"{response[:119] + '…' if len(response) > 120 else response} |")
        for name, rows in self.top.items():
            lines += ["", f"### Top {len(rows)} of `{name}`", "", *markdown_rows(rows, texts)]
        return "\n".join(lines)


def concept_map(scores: Scores, top: int = 5) -> ConceptMap:
    """The concept × data map of ``scores`` (one column per concept): the union of each concept's ``top`` examples,
    ordered by their largest standard score."""
    from scipy.stats import spearmanr

    v = scores.values
    z = (v - v.mean(0)) / np.where(v.std(0) > 0, v.std(0), 1.0)
    tops = {name: scores.top(top, k) for k, name in enumerate(scores.columns)}
    index = {i: n for n, i in enumerate(scores.ids)}
    chosen = list(dict.fromkeys(i for rows in tops.values() for i, _ in rows))
    chosen.sort(key=lambda i: -z[index[i]].max())
    k = len(scores.columns)
    corr = np.atleast_2d(spearmanr(v).statistic) if k > 1 else np.ones((1, 1))
    return ConceptMap(chosen, list(scores.columns), z[[index[i] for i in chosen]], tops, corr)


def write_concept_report(scores: Scores, out: str | Path, texts: Mapping[str, tuple[str, str]] | None = None,
                         top: int = 5, threshold: float = 3.0) -> Path:
    """``out/report.md`` (the map, each concept's top examples with ``texts``: id -> (prompt, response)) and
    ``out/concept_map.png`` (the heatmap); returns the report's path."""
    from ..plots import plot_concept_map

    out = Path(out)
    cmap = concept_map(scores, top)
    plot_concept_map(cmap.z, cmap.ids, cmap.columns, out / "concept_map.png",
                     f"{scores.estimator}: top {top} examples of each of {len(cmap.columns)} concepts")
    meta = scores.metadata
    pairs = [(cmap.correlation[a, b], cmap.columns[a], cmap.columns[b]) for a in range(len(cmap.columns))
             for b in range(a + 1, len(cmap.columns))]
    closest = sorted(pairs, reverse=True)[:5]
    lines = [f"# Concept × data map: {scores.estimator}", "",
             f"{len(scores)} examples scored for {len(cmap.columns)} concepts"
             + (f" from the index `{meta['index']}` ({meta['projection']} projection, rank {meta['rank']}, "
                f"{meta['dtype']}; curvature {meta['curvature']}; checkpoints: {', '.join(meta['checkpoints'])})"
                if "index" in meta else "") + ".", "",
             "Each cell of the map is an example's score for a concept in standard deviations over all scored examples "
             "(positive: training on it pushes the concept up). Rows: the union of each concept's top examples.", "",
             "![concept map](concept_map.png)", ""]
    if closest:
        lines += ["Concepts whose scores agree most over all examples (Spearman): "
                  + "; ".join(f"{a} ~ {b} {rho:.2f}" for rho, a, b in closest) + ".", ""]
    lines += ["## Which concepts each top example moves", "", cmap.to_markdown(texts, threshold), ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
