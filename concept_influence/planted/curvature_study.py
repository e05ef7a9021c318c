"""The curvature study: which preconditioning lets Concept Influence find the planted data, scored once per model.

A narrow fine-tune pool's curvature is largest along the planted data's own gradients, so preconditioning with
factors fitted on the pool alone may discount exactly the cluster being looked for (DESIGN §3). Each variant is
one column of a single scoring pass per checkpoint (the engine scores K queries at once; a damping or a set of
factors only changes the preconditioned query):

- the data the EK-FAC factors are fitted on (``fit_sets``, e.g. the pool, or a sample of pre-training text with
  the pool);
- the damping, ``factor × mean eigenvalue`` per map, or identity curvature (``concept_grad_dot``);
- the query (where the concept is read on the evaluation prompts);
- the checkpoint: the fine-tuned model (``final``), or its sum with the pre-trained one (``sum``, as ``[checkpoints]``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from probes import ConceptDirection

from ..concepts import ConceptFunction
from ..curvature import CurvatureSettings, fit_curvature
from ..data import TokenizedExample
from ..engine import score_with_queries
from ..evaluation import retrieval_metrics
from ..models import ModelAdapter, checkpointed_weights, load_checkpoint

__all__ = ["DAMPING_FACTORS", "run_curvature_study", "variant_name", "format_curvature_table"]

DAMPING_FACTORS = (0.1, 1.0, 10.0, 100.0)


def variant_name(query: str, fit: str, curvature: str, checkpoint: str) -> str:
    """The column name of one variant, e.g. ``last_prompt|pool|ekfac@0.1|sum``."""
    return f"{query}|{fit}|{curvature}|{checkpoint}"


def _score_checkpoint(adapter: ModelAdapter, direction: ConceptDirection, eval_examples: Sequence[TokenizedExample],
                      pool: Sequence[TokenizedExample], fit_sets: Mapping[str, Sequence[TokenizedExample]],
                      queries: Sequence[str], damping_factors: Sequence[float], batch_size: int, seed: int,
                      progress: bool) -> dict[tuple[str, str, str], np.ndarray]:
    """Every variant's scores at the model's current weights: ``{(query, fit, curvature): [N]}``."""
    maps = adapter.linear_maps(max_block=direction.layer)
    settings = CurvatureSettings(batch_size=batch_size, seed=seed)
    fitted = {name: fit_curvature(adapter, examples, maps, settings, progress=progress) for name, examples in fit_sets.items()}
    keys, columns = [], {m.name: [] for m in maps}
    for query in queries:
        grads = ConceptFunction.from_directions(direction, eval_examples, query).gradient(adapter, maps, batch_size=batch_size)
        preconditioned = [((query, "-", "identity"), grads)]
        for fit, curvature in fitted.items():
            preconditioned += [((query, fit, f"ekfac@{f:g}"), curvature.with_damping(damping_factor=f).precondition(grads))
                               for f in damping_factors]
        for key, pre in preconditioned:
            keys.append(key)
            for m in maps:
                columns[m.name].append(pre[m.name][0])
    scores = score_with_queries(adapter, pool, maps, {n: torch.stack(q) for n, q in columns.items()},
                                estimator="curvature_study", columns=["|".join(k) for k in keys], sign=-1.0,
                                batch_size=batch_size, progress=progress)
    return {key: scores.values[:, j] for j, key in enumerate(keys)}


def run_curvature_study(adapter: ModelAdapter, direction: ConceptDirection, eval_examples: Sequence[TokenizedExample],
                        pool: Sequence[TokenizedExample], labels: Sequence[int],
                        fit_sets: Mapping[str, Sequence[TokenizedExample]], base_weights: Mapping[str, torch.Tensor],
                        *, queries: Sequence[str] = ("last_prompt",), damping_factors: Sequence[float] = DAMPING_FACTORS,
                        batch_size: int = 8, seed: int = 0, progress: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """Score every variant at the fine-tuned model (the adapter's weights) and at ``base_weights``, and their sum.
    Returns the study (``{"variants": [...rows with AUROC, AUPRC, P@k]}``) and every variant's scores by
    :func:`variant_name`. The adapter's weights are restored afterwards, also on error."""
    own = checkpointed_weights(adapter)
    per_checkpoint = {}
    try:
        for checkpoint, weights in (("final", None), ("base", base_weights)):
            if weights is not None:
                load_checkpoint(adapter, weights)
            per_checkpoint[checkpoint] = _score_checkpoint(adapter, direction, eval_examples, pool, fit_sets, queries,
                                                           damping_factors, batch_size, seed, progress)
    finally:
        adapter.model.load_state_dict(own, strict=False)
    scores, rows = {}, []
    for key, final in per_checkpoint["final"].items():
        for checkpoint, values in (("final", final), ("sum", final + per_checkpoint["base"][key])):
            name = variant_name(*key, checkpoint)
            scores[name] = values
            query, fit, curvature = key
            rows.append({"query": query, "fit": fit, "curvature": curvature, "checkpoint": checkpoint,
                         **retrieval_metrics(values, labels)})
    study = {"variants": rows, "pool": len(pool), "planted": int(sum(labels)),
             "fit_sets": {k: len(v) for k, v in fit_sets.items()}}
    return study, scores


def format_curvature_table(studies: Mapping[str, dict]) -> str:
    """Markdown: one row per variant, its AUROC in each study (benchmark and seed), then the median and the worst."""
    names = list(studies)
    rows: dict[tuple, dict[str, float]] = {}
    for name, study in studies.items():
        for r in study["variants"]:
            rows.setdefault((r["query"], r["fit"], r["curvature"], r["checkpoint"]), {})[name] = r["auroc"]
    lines = ["| query | factors fitted on | curvature | checkpoint | " + " | ".join(names) + " | median | worst |",
             "|---" * (6 + len(names)) + "|"]
    for key, by_study in rows.items():
        values = [by_study.get(n, float("nan")) for n in names]
        lines.append("| " + " | ".join(key) + " | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {np.nanmedian(values):.3f} | {np.nanmin(values):.3f} |")
    return "\n".join(lines)
