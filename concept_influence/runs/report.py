"""The report stage: ``report/report.md`` (the concept check's verdict, the checkpoints and their weights, the stability
check, the top and bottom examples with their text and their score at each checkpoint) and the plot of the score
distribution."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..data import read_chats
from ..fileio import atomic_write_text
from ..scores import Scores
from .folder import Run
from .inputs import describe_fit
from .stability import answer_ranking

__all__ = ["write_report", "markdown_rows"]


def write_report(run: Run, k: int, checkpoints: Sequence = ()) -> Path:
    """Write ``report/report.md`` (``k`` examples at each end) and ``report/score_distribution.png`` from the
    run's merged scores, with the score at each of ``checkpoints`` (:class:`~.checkpoints.Point`) beside the sum;
    returns the report's path."""
    from ..plots import plot_score_distribution

    cfg = run.config
    scores = Scores.load(run.scores_path)
    answer, which = answer_ranking(run, scores)
    union_top = answer.top(k) if which == "union" else []
    wanted = {i for i, _ in scores.top(k)} | {i for i, _ in scores.bottom(k)} | {i for i, _ in union_top}
    texts = {ex.id: (ex.prompt, ex.response) for ex in read_chats(cfg.data.train) if ex.id in wanted}
    at = {p.name: dict(zip(part.ids, part.column(0))) for p in checkpoints for part in [Scores.load(p.scores_path)]}
    out = run.path / "report"
    plot_score_distribution(scores.column(0), out / "score_distribution.png", scores.estimator)
    info = run.record
    lines = [f"# Run report: {scores.estimator}", "",
             f"Run folder `{run.path}`; model `{cfg.model.path}` (fingerprint "
             f"{info['fingerprints'].get('model')}); data `{cfg.data.train}` ({len(scores)} examples scored, "
             f"{scores.metadata.get('n_skipped', 0)} skipped because their response was cut away at "
             f"max_length = {cfg.data.max_length}); "
             f"concept: {'probe' if cfg.probe else cfg.concept.type} at `{(cfg.probe or cfg.concept).hook}`."
             f"{_factors_sentence(info)}", "",
             *_check_section(info), *_checkpoint_section(checkpoints), *_stability_section(info),
             *_union_section(union_top, texts, k),
             f"## Top {k}: training on these pushes the concept up", "", *markdown_rows(scores.top(k), texts, at), "",
             f"## Bottom {k}: training on these pushes it down", "", *markdown_rows(scores.bottom(k), texts, at), "",
             "![score distribution](score_distribution.png)", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _factors_sentence(info: dict) -> str:
    """`` Factors fitted on 600 training + 600 extra examples (…).`` when ``[factors] extra_data`` was given."""
    fitted_on = info["stages"].get("factors", {}).get("fitted_on")
    return f" Factors fitted on {describe_fit(fitted_on)}." if fitted_on else ""


def _check_section(info: dict) -> list[str]:
    check = info["stages"].get("check")
    if check is None:
        return ["## Is the concept causal?", "", "Not checked (`concept.check = false`, or a saved direction without "
                "`concept.check_positive` and `check_negative`): the scores show what moves the direction, which is the "
                "data behind the behaviour only if moving the direction moves the behaviour.", ""]
    rows = [f"| {where} | {check['first_order'][where]:+.4f} ± {check['first_order_se'][where]:.4f} |"
            for where in check["first_order"]]
    warning = "" if check["verdict"] == "causal" else (
        " **The concept is not causal: read the scores below as what moves the direction, not as the data that causes "
        "the behaviour.**")
    return ["## Is the concept causal?", "",
            f"Verdict: {_bold_verdict(check)}{warning}", "",
            f"Steering along the direction on `{check['positive']}` (positive) vs `{check['negative']}` (negative): "
            f"separation AUROC {check['separation_auroc']:.3f}; first-order effect on log p(positive) − log p(negative) "
            f"in nats per sd of the projection (causal at ≥ {check['threshold']} and two standard errors):", "",
            "| steered positions | effect ± se |", "|---|---:|", *rows, "",
            f"![concept check](../{check['plot']})", ""]


def _bold_verdict(check: dict) -> str:
    """The check's explanation, which starts with its verdict, with the verdict in bold."""
    verdict = check["verdict"]
    return f"**{verdict}**{check['explanation'].removeprefix(verdict)}"


def _checkpoint_section(checkpoints: Sequence) -> list[str]:
    if not checkpoints:
        return []
    rows = [f"| `{p.name}` | `{p.source}` | {'' if p.step is None else p.step} | {p.weight:.4g} |" for p in checkpoints]
    return ["## Checkpoints", "", "The scores are the weighted sum of the scores at each checkpoint, each with its own "
            "curvature and the one concept direction of the run (its scores in `checkpoints/<name>/scores/`):", "",
            "| checkpoint | source | step | weight |", "|---|---|---:|---:|", *rows, ""]


def _stability_section(info: dict) -> list[str]:
    head = ["## Is the top of the ranking stable?", ""]
    stability = info["stages"].get("scores", {}).get("stability")
    if not stability:
        return head + ["Not checked: the estimator has no curvature whose damping could change, and the run no "
                       "checkpoints whose parts could disagree.", ""]
    rows = [f"| {v} | {stability['kinds'].get(v, '')} | {a:.2f} | {stability['spearman'][v]:.3f} |"
            for v, a in stability["agreement"].items()]
    verdict = (f"**NOT stable.** {stability['warning']}." if stability["warning"] else
               f"**Stable**: every variant agrees on at least {stability['threshold']:.0%} of the top "
               f"{stability['top']}, each way (either ranking's top within the other's top {stability['reach']:.0%}).")
    kinds = set(stability["kinds"].values())
    compared = ", ".join(what for kind, what in _VARIANT_KINDS.items() if kind in kinds)
    where = "; the variants are scored in the run's one pass (`scores/variants.safetensors`)" if kinds - {"part"} else ""
    return head + [verdict, "", f"The run's ranking compared with {compared}{where}.", "",
                   "| variant | kind | agreement on the top | Spearman with the run's |", "|---|---|---:|---:|", *rows, ""]


def _union_section(rows: Sequence[tuple[str, float]], texts: dict, k: int) -> list[str]:
    """The top ``k`` of the union of the run's ranking and the behaviour's own (where that was scored)."""
    if not rows:
        return []
    return [f"## Top {k} of the union with the behaviour's own ranking", "",
            "Each example by its best place in the run's ranking or in the ranking of the behaviour's own examples "
            "(classic gradient-dot on `scoring.behaviour`; the score is that place as a fraction, 1 = the top). Over "
            "a family of emergent designs either ranking alone fell below AUROC 0.8 on some (the concept's where it "
            "is not what the data moved, the behaviour's where its examples are narrow), their union on none; it is "
            "the ranking `[filter] ranking = \"union\"` removes.", "", *markdown_rows(rows, texts), ""]


#: How the report names each kind of variant the stability check compares (:mod:`.stability`).
_VARIANT_KINDS = {"damping": "the same factors at damping × 0.01 … × 100", "horizon": "the horizon ÷ 10 and × 10",
                  "identity": "identity curvature (the plain concept gradient dot)",
                  "part": "each checkpoint's part of the sum alone",
                  "behaviour": "the behaviour's own ranking (classic gradient-dot on its examples)"}


def markdown_rows(rows: Sequence[tuple[str, float]], texts: dict[str, tuple[str, str]],
                  at: dict[str, dict[str, float]] | None = None) -> list[str]:
    """A markdown table of ranked ``(id, score)`` rows with each example's prompt and response, shortened, and its
    score at each checkpoint of ``at`` (``{checkpoint: {id: score}}``)."""
    def cell(text: str, width: int) -> str:
        text = " ".join(text.split()).replace("|", "\\|")
        return text if len(text) <= width else text[: width - 1] + "…"

    at = at or {}
    head = "".join(f" {name} |" for name in at)
    out = [f"| rank | score |{head} id | prompt | response |", "|---:|---:|" + "---:|" * len(at) + "---|---|---|"]
    for rank, (i, score) in enumerate(rows, start=1):
        prompt, response = texts.get(i, ("", ""))
        each = "".join(f" {part.get(i, float('nan')):.4g} |" for part in at.values())
        out.append(f"| {rank} | {score:.4g} |{each} `{i}` | {cell(prompt, 120)} | {cell(response, 300)} |")
    return out
