"""The family study's report: every estimator over many designs (median, worst, spread, share under 0.8), the gain
its filter-and-retrain removes, and how often the stability check warned on the runs where it failed and passed."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from concept_influence.fileio import atomic_write_text

from .emergent_family import RETRAINED
from .family_stability import CANDIDATES, GUARDED, RECOMMENDED, UNION

__all__ = ["valid_runs", "format_family_table", "format_design_table", "write_family_report", "HEADLINE"]

#: The rows of the headline table (the full table has every variant).
HEADLINE = (UNION, GUARDED, *CANDIDATES, "source[adam]x1|pool|final", "unrolled[sgd]x1|pool|all", "ekfac@100|pool|all",
            "ekfac@0.1|pool|all", "influence_function|final", "grad_dot|all", "tfidf", "probe_projection", "length",
            "random")


def valid_runs(runs: Mapping[str, dict]) -> tuple[dict, dict]:
    """The runs where planting raised the behaviour (one-sided Welch p < 0.05 over the seeds), and the others: with
    no behaviour to attribute, the planted labels are no ground truth for it."""
    valid = {n: r for n, r in runs.items() if r["behaviour"]["raised"]}
    return valid, {n: r for n, r in runs.items() if n not in valid}


def format_family_table(runs: Mapping[str, dict], estimators: Sequence[str] | None = None) -> str:
    """Markdown: per estimator, its AUROC median, worst, spread and share of runs under 0.8 over ``runs``, the share
    of the planting gain removed where it was retrained, and the stability check's warnings on its runs under 0.8
    and at or above it."""
    names = list(estimators or next(iter(runs.values()))["auroc"])
    lines = ["| estimator | AUROC median | worst | spread | runs < 0.8 | gain removed median | worst | "
             "warned when < 0.8 | warned when ≥ 0.8 |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        values = np.array([r["auroc"][name] for r in runs.values()])
        removed = [r["behaviour"]["removed"][name]["share_of_gain_removed"] for r in runs.values()
                   if name in r["behaviour"]["removed"]]
        warned = {True: [], False: []}
        for r in runs.values():
            check = r["stability"].get(RECOMMENDED if name in (GUARDED, UNION) else name)  # (by the recommended's check)
            if check is not None:
                warned[bool(r["auroc"][name] < 0.8)].append(not check["stable"])
        cells = [f"{np.median(values):.3f}", f"{values.min():.3f}", f"{np.ptp(values):.3f}", f"{(values < 0.8).mean():.0%}",
                 f"{np.median(removed):.0%}" if removed else "-", f"{min(removed):.0%}" if removed else "-",
                 *(f"{sum(w)}/{len(w)}" if w else "-" for w in (warned[True], warned[False]))]
        lines.append(f"| {'**' + name + '**' if name in (RECOMMENDED, UNION) else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_design_table(runs: Mapping[str, dict]) -> str:
    """Markdown: one row per run: its design, planting gain and the recommended and old estimators' AUROC."""
    old = "ekfac@0.1|pretrain+pool|base+final"
    lines = ["| run | design | planting gain (seed sd) | p | source AUROC | stable | union AUROC | old default AUROC | "
             "tfidf |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        c, b = r["config"], r["behaviour"]
        design = (f"{c.get('source', 'demo')}→{c.get('target', 'demo')}, {c.get('marker', '-')}, "
                  f"{len(c.get('domains') or []) or '-'} domains, {c['lr_schedule']} lr {c['finetune_lr']:g} × "
                  f"{c['finetune_epochs']} ep, vocab {c['vocab_size']}, rate {c['rate']:g}, pool {c['n_pool']}")
        lines.append(f"| {name} | {design} | {b['effect_size']:.1f} | {b['p_value']:.2g} | {r['auroc'][RECOMMENDED]:.3f} | "
                     f"{'yes' if r['stability'][RECOMMENDED]['stable'] else 'NO'} | {r['auroc'][UNION]:.3f} | "
                     f"{r['auroc'][old]:.3f} | "
                     f"{r['auroc']['tfidf']:.3f} |")
    return "\n".join(lines)


def write_family_report(out: str | Path, runs: Mapping[str, dict], command: str) -> Path:
    """``out/README.md``: the headline table over the valid runs, the runs excluded, every run's design and the full
    table of every variant."""
    valid, excluded = valid_runs(runs)
    path = Path(out) / "README.md"
    parts = [f"# Concept Influence over a family of designs\n\nCommand: `{command}`\n",
             f"{len(runs)} runs; {len(valid)} where planting raised the behaviour (one-sided Welch p < 0.05 over the "
             f"fine-tuning seeds) are in the tables; {len(excluded)} where it did not are listed below and left out (no "
             "behaviour to attribute). Retrained: " + ", ".join(RETRAINED) + " (top as many as were planted removed).\n",
             "## Headline\n", format_family_table(valid, [n for n in HEADLINE if n in next(iter(runs.values()))["auroc"]])
             if valid else "(no run where planting raised the behaviour)",
             "\n## Runs\n", format_design_table(runs),
             "\n## Every variant\n", format_family_table(valid) if valid else "(no valid run)"]
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
