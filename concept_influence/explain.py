"""Explain the top of a ranking with SAE latents: which latents the most influential training examples share,
clusters of those examples by their latents, and influence aggregated per latent.

Each example is described by its SAE latent activations over its response tokens (mean per latent,
:func:`concept_influence.sae_concepts.latent_activations`). Two views:

* **elevation**: how much higher a latent's mean activation is on the top-k than on all examples, in standard
  deviations over all examples — this sees latents that fire everywhere but more strongly on the top-k, which the
  presence view below cannot.
* **characteristic latents**: the ``latents_per_example`` latents with the highest mean activation on an example.
  For each latent, how many of the top-k examples carry it against the share of all examples that do
  (``enrichment`` = share in the top-k / share overall); the top-k examples are clustered by these sets (Jaccard
  distance, scikit-learn agglomerative clustering, average linkage).
* **influence per latent**: each example's score is split over the latents in proportion to their mean activation,
  ``influence_j = Σ_i s_i · a_ij / Σ_j' a_ij'``; summed over the latents, plus the scores of examples on which no
  latent fires (``unexplained``), this is exactly the total score (of the top-k, or of all examples). Scores with an
  arbitrary offset (a projection that is negative on every example, uniform random scores) say more after centring
  (``center=True``: s_i minus the mean score over all examples, so the split says what the top-k adds over an
  average example).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .data import TokenizedExample
from .models import ModelAdapter
from .scores import Scores

__all__ = ["Explanation", "LatentCluster", "explain_top", "explain_to_folder", "aggregate_by_latent",
           "characteristic_latents"]


def characteristic_latents(mean: np.ndarray, m: int) -> np.ndarray:
    """Boolean ``[N, L]``: for each row, its ``m`` largest positive entries."""
    mean = np.asarray(mean)
    out = np.zeros(mean.shape, dtype=bool)
    if m <= 0 or not mean.size:
        return out
    m = min(m, mean.shape[1])
    top = np.argpartition(-mean, m - 1, axis=1)[:, :m]
    rows = np.arange(len(mean))[:, None]
    out[rows, top] = True
    return out & (mean > 0)


def aggregate_by_latent(scores: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, float]:
    """Split each example's score over the latents in proportion to their (non-negative) mean activation:
    returns ``[L]`` per-latent sums and the summed score of examples with no active latent; the two add up
    to ``scores.sum()``."""
    a = np.clip(np.asarray(mean, dtype=np.float64), 0, None)
    mass = a.sum(1)
    active = mass > 0
    weights = np.divide(a, mass[:, None], out=np.zeros_like(a), where=active[:, None])
    scores = np.asarray(scores, dtype=np.float64)
    return weights.T @ scores, float(scores[~active].sum())


@dataclass
class LatentCluster:
    """Top-ranked examples grouped by the latents they carry: member ids and scores, and the latents shared by at
    least half of the members with the share of members carrying each."""

    ids: list[str]
    scores: np.ndarray
    shared: list[tuple[int, float]]

    @property
    def size(self) -> int:
        return len(self.ids)


@dataclass
class Explanation:
    """What the ``k`` top-ranked examples of one score column carry, in SAE latents (see the module docstring).
    Per-latent arrays are aligned with ``latents``."""

    estimator: str
    column: str
    k: int
    latents_per_example: int
    top_ids: list[str]
    top_scores: np.ndarray
    latents: np.ndarray
    n_top: np.ndarray
    n_all: np.ndarray
    n_examples: int
    elevation: np.ndarray
    influence_top: np.ndarray
    influence_all: np.ndarray
    unexplained_top: float
    unexplained_all: float
    clusters: list[LatentCluster]
    cluster_of: np.ndarray
    top_activations: np.ndarray
    labels: dict[int, str] = field(default_factory=dict)
    offset: float = 0.0  # subtracted from every score before the split (the mean score with center=True)

    @property
    def share_top(self) -> np.ndarray:
        return self.n_top / max(self.k, 1)

    @property
    def share_all(self) -> np.ndarray:
        return self.n_all / max(self.n_examples, 1)

    @property
    def enrichment(self) -> np.ndarray:
        """Share of the top-k carrying a latent over the share of all examples carrying it (1 = no different)."""
        return np.divide(self.share_top, self.share_all, out=np.zeros(len(self.latents)), where=self.n_all > 0)

    def _pick(self, key: np.ndarray, n: int, keep: np.ndarray | None = None, tie: np.ndarray | None = None) -> list[int]:
        keep = np.ones(len(key), bool) if keep is None else keep
        tie = np.zeros(len(key)) if tie is None else tie
        order = [i for i in np.lexsort((-tie, -key)) if keep[i]]
        return [int(self.latents[i]) for i in order[:n]]

    def shared_latents(self, n: int = 10) -> list[int]:
        """Latents carried by the most top-k examples (ties: the more enriched first)."""
        return self._pick(self.n_top.astype(float), n, self.n_top > 0, self.enrichment)

    def distinctive_latents(self, n: int = 10, min_count: int | None = None) -> list[int]:
        """Latents most over-represented in the top-k relative to all examples, among those carried by at least
        ``min_count`` top-k examples (default: 5 % of k, at least 2)."""
        min_count = max(2, round(0.05 * self.k)) if min_count is None else min_count
        return self._pick(self.enrichment, n, self.n_top >= min_count, self.n_top.astype(float))

    def elevated_latents(self, n: int = 10) -> list[int]:
        """Latents whose mean activation is most raised on the top-k (in standard deviations over all examples)."""
        return self._pick(self.elevation, n)

    def influential_latents(self, n: int = 10, among: str = "top") -> list[int]:
        """Latents with the largest aggregated influence over the top-k (``among="top"``) or all examples."""
        return self._pick(self.influence_top if among == "top" else self.influence_all, n)

    def row(self, latent: int) -> dict:
        """Every per-latent number for one latent."""
        j = int(np.flatnonzero(self.latents == latent)[0])
        return {"latent": int(latent), "label": self.labels.get(int(latent), ""), "n_top": int(self.n_top[j]),
                "share_top": float(self.share_top[j]), "share_all": float(self.share_all[j]),
                "enrichment": float(self.enrichment[j]), "elevation": float(self.elevation[j]),
                "influence_top": float(self.influence_top[j]),
                "influence_all": float(self.influence_all[j])}

    def latent_table(self, latents: Sequence[int]) -> str:
        """A markdown table of the given latents."""
        lines = ["| latent | top tokens | in top-k | in all | enrichment | elevation (sd) | influence (top-k) | "
                 "influence (all) |", "|---|---|---|---|---|---|---|---|"]
        for latent in latents:
            r = self.row(latent)
            lines.append(f"| {r['latent']} | {r['label']} | {r['n_top']}/{self.k} | {r['share_all']:.1%} | "
                         f"{r['enrichment']:.2f} | {r['elevation']:.2f} | {r['influence_top']:.4g} | {r['influence_all']:.4g} |")
        return "\n".join(lines)

    def to_markdown(self, n_latents: int = 10, texts: Mapping[str, str] | None = None, width: int = 90) -> str:
        """Shared, distinctive and most influential latents, the clusters, and how the totals split."""
        total_top = float((self.top_scores - self.offset).sum())
        lines = [f"### Top {self.k} of `{self.estimator}` ({self.column}) in SAE latents", "",
                 f"Each example's characteristic latents: its {self.latents_per_example} most active latents on "
                 "its response. Enrichment: share of the top-k carrying a latent over its share among all "
                 f"{self.n_examples} examples. Elevation: mean activation on the top-k minus over all examples, in standard "
                 "deviations over all examples. Influence: each score split over the latents by activation share "
                 f"(top-k total {total_top:.4g}, of which {self.unexplained_top:.4g} on examples with no active "
                 "latent" + (f"; scores centred by subtracting their mean {self.offset:.4g}" if self.offset else "")
                 + ").", "",
                 "**Shared by the most top-ranked examples**", "", self.latent_table(self.shared_latents(n_latents)), "",
                 "**Most over-represented in the top-ranked examples**", "",
                 self.latent_table(self.distinctive_latents(n_latents)), "",
                 "**Most elevated activation in the top-ranked examples**", "",
                 self.latent_table(self.elevated_latents(n_latents)), "",
                 "**Largest aggregated influence (top-k)**", "", self.latent_table(self.influential_latents(n_latents)),
                 "", "**Clusters of the top-ranked examples by their latents**", "",
                 "| cluster | size | mean score | shared latents (share of members) | examples |", "|---|---|---|---|---|"]
        for c_i, c in enumerate(self.clusters):
            shared = ", ".join(f"{l}" + (f" ({self.labels[l]})" if l in self.labels else "") + f" {s:.0%}"
                               for l, s in c.shared[:5]) or "—"
            shown = []
            for i in c.ids[:3]:
                t = " ".join((texts or {}).get(i, "").split())
                shown.append(f"`{i}`" + (f" {t[:width]}{'…' if len(t) > width else ''}" if t else ""))
            lines.append(f"| {c_i} | {c.size} | {np.mean(c.scores):.4g} | {shared} | {'<br>'.join(shown)} |")
        return "\n".join(lines) + "\n"

    def to_json(self, n_latents: int = 20) -> dict:
        """The summary as plain JSON types."""
        return {"estimator": self.estimator, "column": self.column, "k": self.k,
                "latents_per_example": self.latents_per_example, "top_ids": self.top_ids,
                "offset": self.offset, "total_top": float((self.top_scores - self.offset).sum()),
                "unexplained_top": self.unexplained_top,
                "unexplained_all": self.unexplained_all,
                "shared": [self.row(l) for l in self.shared_latents(n_latents)],
                "distinctive": [self.row(l) for l in self.distinctive_latents(n_latents)],
                "elevated": [self.row(l) for l in self.elevated_latents(n_latents)],
                "influential": [self.row(l) for l in self.influential_latents(n_latents)],
                "clusters": [{"ids": c.ids, "mean_score": float(np.mean(c.scores)), "shared": c.shared}
                             for c in self.clusters]}


def _clusters(carried: np.ndarray, n_clusters: int) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import pairwise_distances

    if len(carried) < 2 or n_clusters < 2:
        return np.zeros(len(carried), dtype=int)
    distance = pairwise_distances(carried, metric="jaccard")
    return AgglomerativeClustering(n_clusters=min(n_clusters, len(carried)), metric="precomputed",
                                   linkage="average").fit_predict(distance)


def explain_top(scores: Scores, sae, adapter: ModelAdapter, examples: Sequence[TokenizedExample], k: int = 50, *,
                column: int | str = 0, latents_per_example: int = 8, n_clusters: int | None = None,
                activations=None, labels: Mapping[int, str] | None = None, center: bool = False,
                batch_size: int = 16, progress: bool = False) -> Explanation:
    """Explain the ``k`` highest-scored ``examples`` (one score ``column``) with the SAE's latents: latents they
    share, clusters of them by their characteristic latents (``n_clusters``, default ≈ √(k/2), at least 2), and
    influence aggregated per latent over the top-k and over all examples.

    ``examples`` are the scored training examples (every one needs a score). ``activations``: latent activations
    already collected on exactly these examples (:func:`.sae_concepts.latent_activations`), to explain several
    rankings with one pass; otherwise they are collected here (the SAE is checked against the model first).
    ``labels`` names latents in the tables (e.g. :func:`.sae_concepts.describe_latents`). ``center``: split
    each score minus the mean score over all examples (for scores with an arbitrary offset); the top-k are the
    same either way."""
    from .sae_concepts import latent_activations

    if not 1 <= k <= len(examples):
        raise ValueError(f"k must be in 1..{len(examples)} (the number of examples), got {k}")
    if latents_per_example < 1:
        raise ValueError(f"latents_per_example must be at least 1, got {latents_per_example}")
    ids = [e.id for e in examples]
    col = scores.column_index(column)
    values = scores.aligned(ids)[:, col]
    if activations is None:
        activations = latent_activations(sae, adapter, examples, batch_size=batch_size, progress=progress)
    elif activations.ids != ids:
        raise ValueError("activations were collected on other examples (or in another order) than `examples`")
    top = np.argsort(-values, kind="stable")[:k]
    carried = characteristic_latents(activations.mean, latents_per_example)
    offset = float(values.mean()) if center else 0.0
    infl_all, unexplained_all = aggregate_by_latent(values - offset, activations.mean)
    infl_top, unexplained_top = aggregate_by_latent(values[top] - offset, activations.mean[top])
    n_top, n_all = carried[top].sum(0), carried.sum(0)
    mean = activations.mean.astype(np.float64)
    sd = mean.std(0)
    elevation = np.divide(mean[top].mean(0) - mean.mean(0), sd, out=np.zeros(mean.shape[1]), where=sd > 0)
    n_clusters = max(2, int(round(np.sqrt(k / 2)))) if n_clusters is None else n_clusters
    assignment = _clusters(carried[top], n_clusters)
    clusters = []
    for c in np.unique(assignment):
        members = top[assignment == c]
        share = carried[members].mean(0)
        shared = [(int(activations.latents[j]), float(share[j])) for j in np.argsort(-share, kind="stable")
                  if share[j] >= 0.5]
        clusters.append(LatentCluster([ids[i] for i in members], values[members], shared))
    order = sorted(range(len(clusters)), key=lambda c: -float(np.sum(clusters[c].scores)))
    clusters = [clusters[c] for c in order]
    renumber = {old: new for new, old in enumerate(np.unique(assignment)[order])}
    return Explanation(scores.estimator, scores.columns[col], k, latents_per_example, [ids[i] for i in top], values[top],
                       activations.latents, n_top, n_all, len(examples), elevation, infl_top, infl_all, unexplained_top,
                       unexplained_all, clusters, np.array([renumber[a] for a in assignment]),
                       activations.mean[top], dict(labels or {}), offset)


def explain_to_folder(scores: Scores, sae, adapter: ModelAdapter, examples: Sequence[TokenizedExample], out: str | Path,
                      k: int = 50, *, n_latents: int = 10, progress: bool = False, **options) -> str:
    """:func:`explain_top` of the top ``k`` (``options`` are its keywords) with the latents named by where they fire,
    written to ``out`` as ``explain.md`` (returned), ``explain.json`` and ``latent_influence.png``."""
    from .fileio import atomic_write_text
    from .plots import plot_latent_influence
    from .sae_concepts import describe_latents, latent_activations

    acts = latent_activations(sae, adapter, examples, progress=progress)
    explanation = explain_top(scores, sae, adapter, examples, min(k, len(examples)), activations=acts, **options)
    shown = explanation.shared_latents(20) + explanation.distinctive_latents(20) + explanation.influential_latents(20)
    explanation.labels = describe_latents(acts, examples, adapter.tokenizer, sorted(set(shown)))
    texts = {e.id: adapter.tokenizer.decode(list(e.input_ids[e.response_start:]), skip_special_tokens=True)
             for e in examples}
    text = explanation.to_markdown(n_latents, texts)
    out = Path(out)
    atomic_write_text(out / "explain.md", text)
    atomic_write_text(out / "explain.json", json.dumps(explanation.to_json(), indent=1))
    plot_latent_influence(explanation, out / "latent_influence.png")
    return text
