"""Retrieval metrics of a ranking against known (planted) labels, and the recall of a found top k against exact scores."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = ["retrieval_metrics", "precision_at_k", "top_k_recall"]


def precision_at_k(scores: Sequence[float], labels: Sequence[int], k: int) -> float:
    """Share of positives among the ``k`` highest scores (ties broken by position)."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:k]
    return float(np.asarray(labels)[order].mean()) if k > 0 else float("nan")


def top_k_recall(found: Sequence[int], exact: Sequence[float], k: int) -> float:
    """The share of the true top ``k`` by ``exact`` scores (ties broken by position) that ``found`` (indices into
    ``exact``) holds: the true recall a certified retrieval's bound is about."""
    if not 1 <= k <= len(exact):
        raise ValueError(f"k = {k}: expected 1 <= k <= {len(exact)} (the number of exact scores)")
    true_top = np.argsort(-np.asarray(exact, dtype=float), kind="stable")[:k]
    return len(np.intersect1d(np.asarray(found, dtype=int), true_top)) / k


def retrieval_metrics(scores: Sequence[float], labels: Sequence[int], k: int | None = None) -> dict[str, float]:
    """AUROC, AUPRC (average precision) and precision@k of ``scores`` for binary ``labels``.
    ``k`` defaults to the number of positives."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=int)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    if labels.min() == labels.max():
        raise ValueError("labels must contain both classes")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are not finite")
    k = int(labels.sum()) if k is None else k
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
        "precision_at_k": precision_at_k(scores, labels, k),
        "k": k,
    }
