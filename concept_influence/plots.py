"""Plots of a ranking against planted labels: PR curves, score histograms, fast-vs-full scatter, and
behaviour after removing the top of each ranking. Each function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["plot_pr_curves", "plot_score_histograms", "plot_fast_vs_full", "plot_behaviour_removal"]


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_pr_curves(scores: Mapping[str, np.ndarray], labels: Sequence[int], path: str | Path) -> Path:
    """Precision-recall curve of every ranking, with the base rate as a dashed line."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    plt = _pyplot()
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, s in scores.items():
        precision, recall, _ = precision_recall_curve(labels, s)
        ax.plot(recall, precision, label=f"{name} (AP {average_precision_score(labels, s):.2f})")
    ax.axhline(labels.mean(), color="grey", ls="--", lw=1, label="base rate")
    ax.set(xlabel="recall", ylabel="precision", title="Retrieval of planted examples", ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_score_histograms(scores: Mapping[str, np.ndarray], labels: Sequence[int], path: str | Path) -> Path:
    """One panel per ranking: score histograms of planted vs clean examples."""
    plt = _pyplot()
    labels = np.asarray(labels).astype(bool)
    n = len(scores)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, s) in zip(axes.flat, scores.items()):
        bins = np.histogram_bin_edges(s, bins=30)
        ax.hist(s[~labels], bins=bins, alpha=0.6, density=True, label="clean")
        ax.hist(s[labels], bins=bins, alpha=0.6, density=True, label="planted")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return _save(fig, path)


def plot_fast_vs_full(full: tuple[str, np.ndarray], fast: Mapping[str, np.ndarray], labels: Sequence[int],
                      path: str | Path) -> Path:
    """Scatter of each fast score against the full one, planted examples highlighted, Spearman ρ in the title."""
    from scipy.stats import spearmanr

    plt = _pyplot()
    labels = np.asarray(labels).astype(bool)
    full_name, full_scores = full
    fig, axes = plt.subplots(1, len(fast), figsize=(4.2 * len(fast), 3.8), squeeze=False)
    for ax, (name, s) in zip(axes.flat, fast.items()):
        ax.scatter(full_scores[~labels], s[~labels], s=6, alpha=0.5, label="clean")
        ax.scatter(full_scores[labels], s[labels], s=8, alpha=0.8, label="planted")
        ax.set(xlabel=full_name, ylabel=name, title=f"{name}: Spearman {spearmanr(full_scores, s)[0]:.2f}")
    axes.flat[0].legend(fontsize=7)
    return _save(fig, path)


def plot_behaviour_removal(points: Mapping[str, Mapping[float, Sequence[float]]], clean: Sequence[float],
                           planted: Sequence[float], path: str | Path, ylabel: str = "behaviour") -> Path:
    """Behaviour (mean ± sd over seeds) against the fraction of the pool removed, one line per ranking;
    fraction 0 is the planted fine-tune and the clean fine-tune is the dashed reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, by_fraction in points.items():
        fractions = [0.0] + sorted(by_fraction)
        values = [list(planted)] + [list(by_fraction[f]) for f in sorted(by_fraction)]
        ax.errorbar(fractions, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o",
                    capsize=3, label=name)
    ax.axhline(np.mean(clean), color="black", ls="--", lw=1, label="clean fine-tune")
    ax.set(xlabel="fraction of the training pool removed (top of the ranking)", ylabel=ylabel,
           title="Behaviour after filtering and retraining")
    ax.legend(fontsize=7)
    return _save(fig, path)
