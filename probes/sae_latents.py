"""Which SAE latents carry a behaviour, from latent activations already collected: per-example activations
(:class:`LatentActivations`, the mean and maximum of every latent over each example's tokens and where the maximum
is), and latents ranked by how well they separate concept-positive from concept-negative examples (and by cosine
with a probe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .directions import ConceptDirection
from .sae import SAEError

__all__ = ["LatentActivations", "LatentRanking", "latent_separation", "auroc_columns", "SORT_KEYS"]


@dataclass
class LatentActivations:
    """Per-example latent activations over the tokens of ``reduction``: ``mean`` and ``max`` ``[N, n_latents]``
    and ``argmax`` (the token index of the maximum) for the examples ``ids``; column j is latent ``latents[j]``."""

    ids: list[str]
    mean: np.ndarray
    max: np.ndarray
    argmax: np.ndarray
    latents: np.ndarray
    hook_name: str
    reduction: str

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, latent: int) -> int:
        """The column of ``latent`` (SAEError when it was not collected)."""
        hits = np.flatnonzero(self.latents == latent)
        if not len(hits):
            raise SAEError(f"latent {latent} was not collected (collected: {len(self.latents)} latents)")
        return int(hits[0])

    @classmethod
    def concat(cls, parts: Sequence["LatentActivations"]) -> "LatentActivations":
        """Rows of several collections (same latents, hook and reduction) in order."""
        first = parts[0]
        if any(not np.array_equal(p.latents, first.latents) or (p.hook_name, p.reduction) !=
               (first.hook_name, first.reduction) for p in parts):
            raise SAEError("cannot join latent activations of different latents, hooks or reductions")
        return cls([i for p in parts for i in p.ids], *(np.concatenate([getattr(p, a) for p in parts])
                                                        for a in ("mean", "max", "argmax")),
                   first.latents, first.hook_name, first.reduction)

    def subset(self, rows: Sequence[int]) -> "LatentActivations":
        rows = list(rows)
        return LatentActivations([self.ids[i] for i in rows], self.mean[rows], self.max[rows], self.argmax[rows],
                                 self.latents, self.hook_name, self.reduction)


def auroc_columns(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """AUROC of each column for separating ``positive`` rows from ``negative`` rows (Mann-Whitney U with
    average ranks for ties, as scikit-learn's ``roc_auc_score``), vectorised over columns."""
    from scipy.stats import rankdata

    n_pos, n_neg = len(positive), len(negative)
    if not n_pos or not n_neg:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative rows")
    ranks = rankdata(np.concatenate([positive, negative]), axis=0)
    return (ranks[:n_pos].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass
class LatentRanking:
    """Every latent's separation of concept-positive from concept-negative examples, ranked by ``sort_by``.

    ``columns`` maps a measure to a ``[n_latents]`` array aligned with ``latents``: ``mean_pos``, ``mean_neg``,
    ``diff`` (mean_pos − mean_neg), ``auroc`` (the latent's activation as a classifier of positive vs negative),
    ``freq_pos``/``freq_neg`` (share of examples where it fires), and with a probe ``cos_decoder``/``cos_encoder``
    (cosine of the latent's decoder row / encoder column with the probe direction). ``order`` lists positions in
    ``latents``, best first."""

    latents: np.ndarray
    columns: dict[str, np.ndarray]
    sort_by: str
    order: np.ndarray
    labels: dict[int, str] = field(default_factory=dict)

    def top(self, n: int = 10) -> list[int]:
        """The ``n`` best latents."""
        return [int(self.latents[i]) for i in self.order[:n]]

    def _row_at(self, j: int) -> dict:
        latent = int(self.latents[j])
        return {"latent": latent, **{k: float(v[j]) for k, v in self.columns.items()},
                **({"label": self.labels[latent]} if latent in self.labels else {})}

    def row(self, latent: int) -> dict:
        """Every measure of one latent (and its label, when set)."""
        hits = np.flatnonzero(self.latents == latent)
        if not len(hits):
            raise SAEError(f"latent {latent} is not in this ranking")
        return self._row_at(int(hits[0]))

    def rows(self, n: int | None = None) -> list[dict]:
        """The rows of the ``n`` best latents (all by default), best first."""
        return [self._row_at(int(j)) for j in self.order[: len(self.order) if n is None else n]]

    def to_markdown(self, n: int = 15) -> str:
        """The top ``n`` latents as a markdown table."""
        names = list(self.columns)
        head = "| rank | latent | " + " | ".join(names) + (" | top tokens |" if self.labels else " |")
        lines = [head, "|" + "---|" * (len(names) + 2 + bool(self.labels))]
        for r, row in enumerate(self.rows(n), start=1):
            cells = " | ".join(f"{row[k]:.3f}" for k in names)
            lines.append(f"| {r} | {row['latent']} | {cells} |" + (f" {row.get('label', '')} |" if self.labels else ""))
        return "\n".join(lines)


SORT_KEYS = ("auroc", "diff", "cos_decoder", "cos_encoder")


def latent_separation(positive: LatentActivations, negative: LatentActivations, sae=None,
                      probe_direction: ConceptDirection | None = None, sort_by: str = "auroc") -> LatentRanking:
    """Rank every latent by how well its activation (the per-example means of ``positive`` and ``negative``,
    collected on the same latents) separates concept-positive from concept-negative examples: AUROC (default), mean
    difference, or — given the SAE and a probe — the cosine of its decoder row or encoder column with the probe
    direction (``sort_by``)."""
    if not np.array_equal(positive.latents, negative.latents):
        raise SAEError("positive and negative activations were collected for different latents")
    if sort_by not in SORT_KEYS:
        raise ValueError(f"sort_by must be one of {SORT_KEYS}, got {sort_by!r}")
    cols = {"mean_pos": positive.mean.mean(0), "mean_neg": negative.mean.mean(0)}
    cols["diff"] = cols["mean_pos"] - cols["mean_neg"]
    cols["auroc"] = auroc_columns(positive.mean, negative.mean)
    cols["freq_pos"] = (positive.max > 0).mean(0)
    cols["freq_neg"] = (negative.max > 0).mean(0)
    if probe_direction is not None:
        if sae is None:
            raise ValueError("cosines with a probe need the SAE")
        if probe_direction.hook_name != positive.hook_name:
            raise SAEError(f"the probe is at {probe_direction.hook_name!r} but the SAE reads {positive.hook_name!r}")
        unit = probe_direction.unit.double()
        if unit.shape[0] != sae.cfg.d_in:
            raise SAEError(f"the probe has size {unit.shape[0]} but the SAE's d_in is {sae.cfg.d_in}")
        idx = torch.from_numpy(positive.latents)
        for name, w in (("cos_decoder", sae.W_dec.detach()[idx]), ("cos_encoder", sae.W_enc.detach()[:, idx].T)):
            w = w.double()
            cols[name] = (w @ unit / w.norm(dim=1).clamp_min(1e-12)).numpy()
    if sort_by not in cols:
        raise ValueError(f"sort_by={sort_by!r} needs a probe direction")
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
    order = np.lexsort((-cols["diff"], -cols[sort_by]))  # ties (e.g. dead latents at AUROC 0.5) by difference
    return LatentRanking(positive.latents, cols, sort_by, order)
