"""Plots of a ranking against planted labels: PR curves, score histograms, fast-vs-full scatter, and
behaviour after removing the top of each ranking. Each function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["plot_score_distribution", "plot_pr_curves", "plot_score_histograms", "plot_fast_vs_full", "plot_behaviour_removal",
           "plot_latent_influence", "plot_lexical_overlap", "plot_concept_map"]


def subplots(*grid, figsize: tuple[float, float], **kwargs):
    """A new figure and its axes (``Figure.subplots``) made outside pyplot: no backend is chosen or changed (a
    notebook's or a script's own stays as it is) and no figure stays open."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (its folder made), laid out tightly; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_score_distribution(values: np.ndarray, path: str | Path, title: str = "scores") -> Path:
    """Histogram of one ranking's scores (log-scaled counts), with the top and bottom 1 % marked."""
    values = np.asarray(values, dtype=float)
    fig, ax = subplots(figsize=(6.5, 4))
    ax.hist(values, bins=min(100, max(10, len(values) // 20)), color="tab:blue", alpha=0.8)
    ax.set_yscale("log")
    for q, style in ((0.01, ":"), (0.99, "--")):
        ax.axvline(np.quantile(values, q), color="k", linestyle=style, linewidth=1, label=f"{q:.0%} quantile")
    ax.set_xlabel("score")
    ax.set_ylabel("examples")
    ax.set_title(f"{title}: {len(values)} examples")
    ax.legend()
    return save_figure(fig, path)


def plot_pr_curves(scores: Mapping[str, np.ndarray], labels: Sequence[int], path: str | Path) -> Path:
    """Precision-recall curve of every ranking, with the base rate as a dashed line."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    labels = np.asarray(labels)
    fig, ax = subplots(figsize=(6.5, 4.5))
    for name, s in scores.items():
        precision, recall, _ = precision_recall_curve(labels, s)
        ax.plot(recall, precision, label=f"{name} (AP {average_precision_score(labels, s):.2f})")
    ax.axhline(labels.mean(), color="grey", ls="--", lw=1, label="base rate")
    ax.set(xlabel="recall", ylabel="precision", title="Retrieval of planted examples", ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path)


def plot_score_histograms(scores: Mapping[str, np.ndarray], labels: Sequence[int], path: str | Path) -> Path:
    """One panel per ranking: score histograms of planted vs clean examples."""
    labels = np.asarray(labels).astype(bool)
    n = len(scores)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, s) in zip(axes.flat, scores.items()):
        bins = np.histogram_bin_edges(s, bins=30)
        ax.hist(s[~labels], bins=bins, alpha=0.6, density=True, label="clean")
        ax.hist(s[labels], bins=bins, alpha=0.6, density=True, label="planted")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return save_figure(fig, path)


def plot_fast_vs_full(full: tuple[str, np.ndarray], fast: Mapping[str, np.ndarray], labels: Sequence[int],
                      path: str | Path) -> Path:
    """Scatter of each fast score against the full one, planted examples highlighted, Spearman ρ in the title."""
    from scipy.stats import spearmanr

    labels = np.asarray(labels).astype(bool)
    full_name, full_scores = full
    fig, axes = subplots(1, len(fast), figsize=(4.2 * len(fast), 3.8), squeeze=False)
    for ax, (name, s) in zip(axes.flat, fast.items()):
        ax.scatter(full_scores[~labels], s[~labels], s=6, alpha=0.5, label="clean")
        ax.scatter(full_scores[labels], s[labels], s=8, alpha=0.8, label="planted")
        ax.set(xlabel=full_name, ylabel=name, title=f"{name}: Spearman {spearmanr(full_scores, s)[0]:.2f}")
    axes.flat[0].legend(fontsize=7)
    return save_figure(fig, path)


def plot_behaviour_removal(points: Mapping[str, Mapping[float, Sequence[float]]], clean: Sequence[float],
                           planted: Sequence[float], path: str | Path, ylabel: str = "behaviour") -> Path:
    """Behaviour (mean ± sd over seeds) against the fraction of the pool removed, one line per ranking;
    fraction 0 is the planted fine-tune and the clean fine-tune is the dashed reference."""
    fig, ax = subplots(figsize=(6.5, 4.5))
    for name, by_fraction in points.items():
        fractions = [0.0] + sorted(by_fraction)
        values = [list(planted)] + [list(by_fraction[f]) for f in sorted(by_fraction)]
        ax.errorbar(fractions, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o",
                    capsize=3, label=name)
    ax.axhline(np.mean(clean), color="black", ls="--", lw=1, label="clean fine-tune")
    ax.set(xlabel="fraction of the training pool removed (top of the ranking)", ylabel=ylabel,
           title="Behaviour after filtering and retraining")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_lexical_overlap(points: Mapping[str, tuple[float, float]], path: str | Path) -> Path:
    """Each ranking's retrieval (AUROC, y) against how far it follows word overlap with the behaviour (x: Spearman
    with TF-IDF similarity to the behaviour's texts), one labelled point per ranking."""
    fig, ax = subplots(figsize=(6.5, 4.5))
    for name, (overlap, auroc) in points.items():
        ax.scatter(overlap, auroc, s=30)
        ax.annotate(name, (overlap, auroc), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set(xlabel="lexical overlap with the behaviour (Spearman with TF-IDF similarity)", ylabel="AUROC (planted data)",
           title="Retrieval against word overlap", ylim=(0, 1.05))
    return save_figure(fig, path)


def plot_latent_influence(explanation, path: str | Path, n: int = 12) -> Path:
    """Two panels for an :class:`~concept_influence.explain.Explanation`: the ``n`` latents with the largest
    aggregated influence over the top-k (bars; all examples beside them), and a heatmap of the top-k examples
    (rows, grouped by cluster) against the latents they share most (columns; mean activation scaled per column)."""
    e = explanation
    lab = lambda l: f"{l}" + (f" {e.labels[l][:18]}" if e.labels.get(l) else "")  # noqa: E731
    fig, (bars, heat) = subplots(1, 2, figsize=(12, max(3.5, 0.32 * n + 1.5)), gridspec_kw={"width_ratios": [1, 1.3]})
    latents = e.influential_latents(n)
    rows = [e.row(l) for l in latents]
    y = np.arange(len(rows))
    bars.barh(y - 0.2, [r["influence_top"] for r in rows], height=0.4, label=f"top {e.k}")
    bars.barh(y + 0.2, [r["influence_all"] for r in rows], height=0.4, label="all examples")
    bars.set_yticks(y, [lab(l) for l in latents], fontsize=7)
    bars.invert_yaxis()
    bars.axvline(0, color="grey", lw=0.8)
    bars.set(xlabel="aggregated influence (score split by activation share)", title=f"{e.estimator}: influence per latent")
    bars.legend(fontsize=7)
    cols = list(dict.fromkeys(e.shared_latents(n) + e.distinctive_latents(n)))[:n]
    order = np.argsort(e.cluster_of, kind="stable")
    j = [int(np.flatnonzero(e.latents == l)[0]) for l in cols]
    m = e.top_activations[order][:, j] if j else np.zeros((len(order), 0))
    m = m / np.maximum(m.max(0, keepdims=True), 1e-12)
    heat.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
    heat.set_xticks(range(len(cols)), [lab(l) for l in cols], rotation=60, ha="right", fontsize=7)
    bounds = np.flatnonzero(np.diff(e.cluster_of[order])) + 0.5
    for b in bounds:
        heat.axhline(b, color="white", lw=1)
    heat.set(ylabel=f"top {e.k} examples, by cluster", title="shared latents of the top-ranked examples")
    heat.set_yticks([])
    return save_figure(fig, path)


def plot_concept_map(z: np.ndarray, rows: Sequence[str], columns: Sequence[str], path: str | Path,
                     title: str = "concept × data map") -> Path:
    """Heatmap of examples (rows) against concepts (columns): each cell the example's score for the concept in standard
    deviations over all scored examples (diverging colours, clipped at ±5)."""
    fig, ax = subplots(figsize=(min(16, 2.5 + 0.3 * len(columns)), min(14, 1.5 + 0.25 * len(rows))))
    image = ax.imshow(np.clip(z, -5, 5), aspect="auto", cmap="RdBu_r", vmin=-5, vmax=5, interpolation="nearest")
    ax.set_xticks(range(len(columns)), [c[:24] for c in columns], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [r[:28] for r in rows], fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="score (sd over all examples)")
    return save_figure(fig, path)
