"""Plots are written as PNG files without touching pyplot: a user's own matplotlib backend (a notebook's widget, a
script's interactive window) stays selected, and no figure is left open."""

import matplotlib
import numpy as np

from concept_influence.plots import plot_pr_curves, plot_score_distribution


def test_plots_keep_the_users_backend_and_leave_no_figure_open(tmp_path):
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for the user's own backend
    try:
        import matplotlib.pyplot as plt

        rng = np.random.default_rng(0)
        labels = np.r_[np.ones(10, bool), np.zeros(90, bool)]
        paths = [plot_score_distribution(rng.normal(size=100), tmp_path / "a" / "scores.png"),
                 plot_pr_curves({"x": rng.normal(size=100) + labels}, labels, tmp_path / "pr.png")]
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    finally:
        matplotlib.use(before)
