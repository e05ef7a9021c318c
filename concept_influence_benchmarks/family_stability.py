"""The family study's candidate rankings and their stability check (:mod:`.emergent_family` scores every variant):
each candidate against its other dampings or horizons, its checkpoint parts, identity curvature and the behaviour's
own ranking; the guarded ranking; and the check done again on a saved run from its scores (``bench emergent
--recheck``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from concept_influence.evaluation import retrieval_metrics
from concept_influence.fileio import atomic_write_text, load_tensors, save_tensors
from concept_influence.stability import check_stability, union_ranking

__all__ = ["DAMPINGS", "HORIZONS", "RECOMMENDED", "CANDIDATES", "GUARDED", "UNION", "check_candidates",
           "recheck_stability", "load_run", "save_run", "save_results"]

#: The study's dampings (x the mean eigenvalue) and horizons (x the fine-tune's own): a candidate is checked against
#: the others.
DAMPINGS = (0.01, 0.1, 1.0, 10.0, 100.0)
HORIZONS = (0.1, 1.0, 10.0)
#: The recommended estimator, chosen from the family (README, issue 30).
RECOMMENDED = "source[adam]x1|pool|all"
#: Rankings whose top is checked for stability.
CANDIDATES = (RECOMMENDED, "source[adam]x1|pretrain+pool|all", "unrolled[adam]x1|pool|all", "unrolled[fisher]x1|pool|all",
              "identity|all", "ekfac@0.1|pretrain+pool|base+final", "ekfac@0.1|pool|final")
#: The recommended ranking where its stability check passes, else the behaviour's own ranking (classic gradient-dot on
#: target-domain bad answers): what a user who heeds the check's warning looks at.
GUARDED = f"{RECOMMENDED}, grad_dot|all when warned"
#: Each example's best place in the recommended ranking or the behaviour's own (:func:`~concept_influence.stability.
#: union_ranking`), fixed after family 3 as the recommendation and checked on family 4, drawn afterwards.
UNION = f"union of {RECOMMENDED} and grad_dot|all"


def check_candidates(results: dict, scores: dict, labels: np.ndarray) -> None:
    """Every candidate's stability check, the guarded and union rankings (:data:`GUARDED`, :data:`UNION`, added to
    ``scores``) and every ranking's AUROC, into ``results``."""
    results["stability"] = {name: _stability(name, scores).to_dict() for name in CANDIDATES}
    warned = not results["stability"][RECOMMENDED]["stable"]
    scores[GUARDED] = np.array(scores["grad_dot|all" if warned else RECOMMENDED])
    scores[UNION] = union_ranking(scores[RECOMMENDED], scores["grad_dot|all"])
    results["auroc"] = {n: retrieval_metrics(s, labels)["auroc"] for n, s in scores.items()}


def recheck_stability(folder: str | Path) -> dict:
    """Check a finished run's candidates again from its saved scores (after the check itself changed): rewrites
    ``folder/results.json`` (and the guarded column of its scores) and returns it; nothing is trained or scored."""
    folder = Path(folder)
    results, scores, labels = load_run(folder)
    check_candidates(results, scores, labels)
    save_run(folder, results, scores, labels)
    return results


def load_run(folder: str | Path) -> tuple[dict, dict, np.ndarray]:
    """A saved run's ``results.json``, its rankings ``{name: scores}`` and its planted labels (what :func:`save_run`
    wrote)."""
    folder = Path(folder)
    results = json.loads((folder / "results.json").read_text())
    scores = {n: t.numpy() for n, t in load_tensors(folder / "scores.safetensors", ValueError).items()}
    return results, scores, _labels(scores, results)


def save_run(folder: Path, results: dict, scores: dict, labels: np.ndarray) -> None:
    """``folder/scores.safetensors`` (every ranking and the planted labels) and ``folder/results.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / "scores.safetensors", {n: torch.from_numpy(np.asarray(v, dtype=np.float64))
                                                 for n, v in {**scores, "planted_labels": labels}.items()})
    save_results(folder, results)


def save_results(folder: Path, results: dict) -> None:
    """``folder/results.json`` alone (the scores unchanged)."""
    atomic_write_text(folder / "results.json", json.dumps(results, indent=1) + "\n")


def _labels(scores: dict, results: dict) -> np.ndarray:
    """The planted labels of a saved run (stored with its scores)."""
    if "planted_labels" not in scores:
        raise ValueError("the run's scores.safetensors has no planted_labels; run the design again")
    labels = scores.pop("planted_labels").astype(bool)
    if int(labels.sum()) != results["planted"]:
        raise ValueError(f"planted_labels marks {int(labels.sum())} examples, results.json says {results['planted']}")
    return labels


def _stability(name: str, scores: dict):
    """The candidate ``name`` (``variant|combination``) against its dampings or horizons, its checkpoint parts (the
    differences of its sums) and identity curvature (summed the same way)."""
    variant, combination = name.rsplit("|", 1)
    variants, kinds = {}, {}
    base = variant.split("@")[0] if "@" in variant else variant.split("x")[0]
    fit = variant.split("|")[1] if "|" in variant else None
    if "@" in variant:
        for f in DAMPINGS:
            variants[f"damping x{f:g}"], kinds[f"damping x{f:g}"] = scores[f"{base}@{f:g}|{fit}|{combination}"], "damping"
    elif variant != "identity":
        for h in (h for h in HORIZONS if f"x{h:g}|" not in name):  # the other horizons than the chosen one
            variants[f"horizon x{h:g}"], kinds[f"horizon x{h:g}"] = scores[f"{base}x{h:g}|{fit}|{combination}"], "horizon"
    if combination != "final":
        final, base_final = scores[f"{variant}|final"], scores[f"{variant}|base+final"]
        parts = {"base": base_final - final}
        if combination == "all":
            parts["middle"] = scores[f"{variant}|all"] - base_final
        parts["final"] = final
        for part, values in parts.items():
            variants[f"part {part}"], kinds[f"part {part}"] = values, "part"
    if variant != "identity":
        variants["identity"], kinds["identity"] = scores[f"identity|{combination}"], "identity"
    # the behaviour's own examples (classic influence, no preconditioning): a concept that is not what training on
    # the planted data moves disagrees with them however it is preconditioned
    variants["classic grad_dot"], kinds["classic grad_dot"] = scores[f"grad_dot|{combination}"], "behaviour"
    return check_stability(scores[name], variants, name=name, kinds=kinds)
