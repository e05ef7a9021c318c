"""Does refining EK-FAC with conjugate gradient fix the sign flips? (issue 30, item 4)

On the emergent family's design f1-11 (family seed 1, index 11) the old default, EK-FAC at 0.1 × mean eigenvalue with
factors on pre-training chats + pool, summed over the base and the fine-tuned model, ranked the planted data worst
(AUROC 0.199 in ``benchmarks/family/README.md``). This trains that design once (the family's own testbed code), and at
each of the two models fits the same EK-FAC and refines the concept's query by 0, 2, 5, 10 and 20 steps of
preconditioned CG on the damped Fisher of the same fit data (:class:`~concept_influence.curvature.RefinedCurvature`),
once with the exact true Fisher (``expected``) and once with the fit's own sampled-label gradients (``sampled``); the
iterates of one 20-step run are the fewer-step answers. Every query is one column of one scoring pass over the pool
per model. Writes TABLE (markdown) and prints it; ``benchmarks/cg_refinement.md`` holds the table with what it shows.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/cg_refinement.py runs/cg-refinement runs/cg-refinement/table.md
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from concept_influence.curvature import CurvatureSettings, RefinedCurvature, fit_curvature
from concept_influence.engine import score_with_queries
from concept_influence.models import load_checkpoint
from concept_influence.toy.small_model import seed_everything
from concept_influence_benchmarks.emergent_config import EmergentConfig
from concept_influence_benchmarks.emergent_family import draw_design, emergent_testbed

STEPS = (0, 2, 5, 10, 20)
LABELS = ("expected", "sampled")
FIT = "pretrain+pool"


def score_point(bed, cfg) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """At the adapter's current weights: each variant's pool scores, and each refined variant's relative residual."""
    adapter, concept = bed.adapter, bed.concept
    maps = adapter.linear_maps(max_block=concept.layer)
    grads = concept.gradient(adapter, maps, batch_size=cfg.batch_size)
    ekfac = fit_curvature(adapter, bed.fit_sets[FIT], maps, CurvatureSettings(batch_size=cfg.batch_size, seed=cfg.seed),
                          progress=False)
    columns, residuals = {"identity": grads}, {}
    for labels in LABELS:
        refined = RefinedCurvature(ekfac, adapter, bed.fit_sets[FIT], steps=max(STEPS), labels=labels, maps=maps,
                                   seed=cfg.seed, batch_size=cfg.batch_size)
        for step, (query, residual) in enumerate(refined.iterates(grads)):
            if step in STEPS:
                columns[f"{labels}|{step}"], residuals[f"{labels}|{step}"] = query, float(residual[0])
    names = list(columns)
    stacked = {m.name: torch.stack([columns[n][m.name][0] for n in names]) for m in maps}
    scores = score_with_queries(adapter, bed.pool, maps, stacked, estimator="cg_refinement", columns=names, sign=-1.0,
                                batch_size=cfg.batch_size, progress=False)
    return {n: scores.values[:, j] for j, n in enumerate(names)}, residuals


def row(name: str, final: np.ndarray, base: np.ndarray, labels: np.ndarray, residuals: tuple[str, str]) -> str:
    cells = [name, *residuals]
    for values in (final, base + final):
        planted = float(values[labels == 1].mean())
        cells += [f"{roc_auc_score(labels, values):.3f}", f"{planted:+.2e}", f"{float(values[labels == 0].mean()):+.2e}"]
    return "| " + " | ".join(cells) + " |"


def main(out: Path, table: Path) -> None:
    started = time.perf_counter()
    cfg = EmergentConfig(**draw_design(11, family_seed=1), n_seeds=3)
    seed_everything(cfg.seed)
    bed = emergent_testbed(cfg, out, progress=False, on_step=None)
    trained = time.perf_counter()
    final, final_res = score_point(bed, cfg)
    load_checkpoint(bed.adapter, bed.pretrained)
    base, base_res = score_point(bed, cfg)
    labels = bed.labels
    lines = ["| query | residual, final | residual, base | AUROC final | planted mean | clean mean "
             "| AUROC base+final | planted mean | clean mean |", "|---" * 9 + "|",
             row("identity (no preconditioning)", final["identity"], base["identity"], labels, ("-", "-"))]
    for name in final:
        if name != "identity":
            labels_kind, step = name.split("|")
            lines.append(row(f"EK-FAC + {step} CG steps, {labels_kind} Fisher", final[name], base[name], labels,
                             (f"{final_res[name]:.3f}", f"{base_res[name]:.3f}")))
    seconds = time.perf_counter() - started
    text = "\n".join(lines)
    print(text, f"\n{seconds:.0f} s in all, {trained - started:.0f} s of it training", flush=True)
    table.write_text(f"<!-- written by benchmarks/cg_refinement.py in {seconds:.0f} s ({trained - started:.0f} s training) "
                     f"-->\n{text}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
