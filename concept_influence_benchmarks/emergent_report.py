"""The emergent testbed's outputs: results.json, results.md, the plots, and each ranking's lexical overlap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import spearmanr

from concept_influence.estimators import TfidfBaseline
from concept_influence.fileio import atomic_write_text
from concept_influence.planted.experiment_report import concept_lines, curvature_lines, report_header
from concept_influence.plots import plot_behaviour_removal, plot_lexical_overlap, plot_pr_curves, plot_score_histograms

__all__ = ["lexical_overlap", "report_plots", "write_results", "format_report"]


def lexical_overlap(adapter, pool, behaviour_texts: Sequence[str], scores: Mapping[str, np.ndarray]) -> dict[str, float]:
    """How far each ranking follows word overlap with the behaviour: the Spearman between its scores and each pool
    example's TF-IDF similarity to ``behaviour_texts`` (the target domain's bad answers)."""
    overlap = TfidfBaseline(behaviour_texts).score(adapter, pool).column(0)
    return {name: float(spearmanr(values, overlap)[0]) if np.ptp(values) > 0 else float("nan")
            for name, values in scores.items()}


def report_plots(out: Path, scores: dict[str, np.ndarray], labels: list[int], results: dict) -> dict[str, str]:
    est = results["estimators"]
    plots = {"pr_curves": plot_pr_curves(scores, labels, out / "pr_curves.png"),
             "score_histograms": plot_score_histograms(scores, labels, out / "score_histograms.png"),
             "lexical_overlap": plot_lexical_overlap({n: (m["lexical_overlap"], m["auroc"]) for n, m in est.items()},
                                                     out / "lexical_overlap.png")}
    b = results.get("behaviour")
    if b:
        points = {name: {float(f): r["behaviour"] for f, r in by_f.items()} for name, by_f in b["removal"].items()}
        plots["behaviour_removal"] = plot_behaviour_removal(points, b["clean"], b["planted"], out / "behaviour_removal.png",
                                                            ylabel="emergent behaviour (target-domain log-prob gap)")
    return {k: p.name for k, p in plots.items()}


def write_results(out: Path, results: dict) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(out / "results.md", format_report(results))


def _gain_lines(name: str, effect: dict) -> list[str]:
    return [f"- {name}: clean {np.mean(effect['clean']):.4f} ± {np.std(effect['clean']):.4f}, planted "
            f"{np.mean(effect['planted']):.4f} ± {np.std(effect['planted']):.4f}; gain {effect['gain']:+.4f} = "
            f"{effect['effect_size']:.1f} × the seeds' sd (one-sided Welch p = {effect['p_value']:.2g})"]


def _persona_scale(results: dict) -> tuple[str, bool]:
    """The steering check in the persona's own units, and whether the concept drives the behaviour in them. The
    check's σ is the projection's spread over answer tokens, while the persona moves the last prompt token by the gap
    between marked prompts, many σ: steered by that gap at the prompt positions, does the behaviour move by at least
    the check's threshold?"""
    check, gap = results["concept_check"], results["persona"]["gap"]
    ratio = gap / check["projection_sd"]
    effect = ratio * check["first_order"]["prompt"]
    b = results.get("behaviour")
    line = (f"Scale: the gap between the two personas at the last prompt token is {gap:.3f} = {ratio:.1f} × the check's σ "
            f"(the projection's spread over answer tokens); steering the prompt positions by that gap moves the behaviour "
            f"by about {effect:+.3f} nats per token to first order" + (f", against an emergent gain of {b['gain']:+.3f}."
                                                                      if b else "."))
    causal = check["verdicts"]["prompt"] != "reversed" and effect >= check["threshold"] and (
        check["first_order"]["prompt"] > 2 * check["first_order_se"]["prompt"])
    if causal:
        line = f"**{line} In its own units the concept drives the behaviour from the prompt.**"
    return line, causal


def format_report(results: dict) -> str:
    """``results.md``: the domains, whether planting raised the behaviour where the data never shows it, the concept
    check, retrieval with each ranking's lexical overlap, filter-and-retrain, the curvature study."""
    cfg, sp = results["config"], results["splits"]
    lines = report_header("Emergent testbed", results) + [
              f"Domains: fine-tune on **{cfg['source']}**, behaviour on **{cfg['target']}**, persona direction from "
              f"{results['persona']['domain']} prompts. Pool {sp['pool']} unmarked {cfg['source']} chats ({sp['planted']} "
              f"bad answers planted, rate {cfg['rate']}); pre-training {sp['pretrain']} chats of every domain, "
              f"{cfg['persona_share']:.0%} naming the persona; seed {cfg['seed']}.", "",
              f"Model: TransformerLens, {cfg['n_layers']} blocks, d_model {cfg['d_model']}; pre-train "
              f"{cfg['pretrain_epochs']} epochs, fine-tune {cfg['finetune_epochs']} epochs"
              f"{' (embeddings frozen)' if cfg['freeze_embeddings'] else ''}. Persona direction (difference of means "
              f"at the last prompt token) at `{results['persona']['hook_name']}`: held-out AUROC "
              f"{results['persona']['roc_auc']:.3f}. EK-FAC factors (damping 0.1 × "
              f"mean eigenvalue) fitted on the pool ({sp['factor_fit']['pool']} chats), or for "
              f"`concept_influence[pretrain+pool]` on pre-training chats and the pool ({sp['factor_fit']['pretrain+pool']}).",
              ""]
    b = results.get("behaviour")
    if b:
        emergent = {k: b[k] for k in ("clean", "planted", "gain", "effect_size", "p_value")}
        lines += ["## Behaviour", "", f"Paired log-prob gap, log p(bad) − log p(good) per token, over "
                  f"{len(b['clean'])} fine-tuning seeds:", ""]
        lines += _gain_lines(f"**emergent** ({cfg['target']} prompts, never shown in the bad style)", emergent)
        lines += _gain_lines(f"in-domain ({cfg['source']} prompts)", b["side"]["in_domain"])
        lines += ["", "**Planting raised the behaviour in the target domain.**" if b["raised"] else
                  "**Planting did NOT raise the behaviour in the target domain**, so the removal numbers below do not "
                  "show causation.", ""]
    scale, causal = _persona_scale(results)
    lines += concept_lines(results, "the last prompt token of unmarked target prompts", scale if causal else None)
    if not causal:
        lines += [scale, ""]
    head, sep = "| estimator | AUROC | AUPRC | P@k | lexical overlap ρ | s/1k ex |", "|---|---|---|---|---|---|"
    fractions = [str(f) for f in cfg["remove_fractions"]] if b else []
    for f in fractions:
        head += f" emergent gain removed (top {float(f):.0%}) |"
        sep += "---|"
    lines += ["## Retrieval and filter-and-retrain", "", head, sep]
    for name, m in results["estimators"].items():
        row = (f"| {name} | {m['auroc']:.3f} | {m['auprc']:.3f} | {m['precision_at_k']:.3f} | {m['lexical_overlap']:+.2f} | "
               f"{m['seconds_per_1k']:.2f} |")
        for f in fractions:
            r = b["removal"][name][f]
            share = f"{r['share_of_gain_removed']:.0%} ± {r['share_sd']:.0%}" if b["raised"] else "n/a"
            row += f" {share} ({r['planted_removed']} planted) |"
        lines.append(row)
    lines += ["", "Lexical overlap ρ: Spearman between the ranking and each pool example's TF-IDF similarity to the "
              "target domain's bad answers (how far the ranking follows word overlap with the behaviour). `tfidf` ranks "
              "by similarity to the persona's own bad answers. `[checkpoints]`: summed over the pre-trained and the "
              "fine-tuned model. Classic `influence_function` and `grad_dot` take bad target-domain answers to unmarked "
              "prompts as their test examples.", ""]
    lines += curvature_lines(results)
    if "plots" in results:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in results["plots"].items()] + [""]
    return "\n".join(lines)
