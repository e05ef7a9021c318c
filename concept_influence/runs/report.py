"""The report stage: ``report/report.md`` (the top and bottom examples with their text) and the plot of the
score distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..data import read_chats
from ..fileio import atomic_write_text
from ..scores import Scores
from .folder import Run

__all__ = ["write_report", "markdown_rows"]


def write_report(run: Run, k: int) -> Path:
    """Write ``report/report.md`` (``k`` examples at each end) and ``report/score_distribution.png`` from the
    run's merged scores; returns the report's path."""
    from ..plots import plot_score_distribution

    cfg = run.config
    scores = Scores.load(run.scores_path)
    wanted = {i for i, _ in scores.top(k)} | {i for i, _ in scores.bottom(k)}
    texts = {ex.id: (ex.prompt, ex.response) for ex in read_chats(cfg.data.train) if ex.id in wanted}
    out = run.path / "report"
    plot_score_distribution(scores.column(0), out / "score_distribution.png", scores.estimator)
    info = run.record
    lines = [f"# Run report: {scores.estimator}", "",
             f"Run folder `{run.path}`; model `{cfg.model.path}` (fingerprint "
             f"{info['fingerprints'].get('model')}); data `{cfg.data.train}` ({len(scores)} examples scored, "
             f"{scores.metadata.get('n_skipped', 0)} skipped because their response was cut away at "
             f"max_length = {cfg.data.max_length}); "
             f"concept: probe at `{cfg.probe.hook}`.", "",
             f"## Top {k}: training on these pushes the concept up", "", *markdown_rows(scores.top(k), texts), "",
             f"## Bottom {k}: training on these pushes it down", "", *markdown_rows(scores.bottom(k), texts), "",
             "![score distribution](score_distribution.png)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def markdown_rows(rows: Sequence[tuple[str, float]], texts: dict[str, tuple[str, str]]) -> list[str]:
    """A markdown table of ranked ``(id, score)`` rows with each example's prompt and response, shortened."""
    def cell(text: str, width: int) -> str:
        text = " ".join(text.split()).replace("|", "\\|")
        return text if len(text) <= width else text[: width - 1] + "…"

    out = ["| rank | score | id | prompt | response |", "|---:|---:|---|---|---|"]
    for rank, (i, score) in enumerate(rows, start=1):
        prompt, response = texts.get(i, ("", ""))
        out.append(f"| {rank} | {score:.4g} | `{i}` | {cell(prompt, 120)} | {cell(response, 300)} |")
    return out
