"""The query study: where and how to read the concept for Concept Influence, scored on one trained benchmark model.

Every variant is one column of a single streaming pass (the engine scores K queries at once, and a query's
damping only changes its preconditioned matrix), so the whole study costs one forward+backward over the pool
for the scores and one for the gradient norms, whatever the number of variants. A variant is:

- the *query* (where f is read on the evaluation prompts): ``response_own`` (response mean on the model's own
  answers), ``last_prompt`` (the last prompt token), ``prompt_mean`` (mean over the prompt tokens),
  ``response_top_k`` (response mean on the k own answers that express the concept most, as the persona-vector
  authors select their queries);
- the probe kind (logistic, difference of means) and its block;
- the curvature: EK-FAC with damping ``factor × mean eigenvalue`` per map, or identity (``concept_grad_dot``);
- the normalisation of ∇L(z): none, or unit norm (TrackStar, Bergson).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from probes import train_probe

from ..activations import collect_activations
from ..concepts import ConceptFunction
from ..curvature import Curvature
from ..data import TokenizedExample
from ..engine import gradient_norms, score_with_queries
from ..estimators.fast_path import concept_readouts
from ..evaluation import retrieval_metrics
from ..models import ModelAdapter

__all__ = ["QUERIES", "StudyGrid", "query_concepts", "run_query_study", "format_query_table", "summarise_study"]

QUERIES = ("response_own", "last_prompt", "prompt_mean", "response_top_k")
QUERY_REDUCTIONS = {"response_own": "response_mean", "last_prompt": "last_prompt", "prompt_mean": "prompt_mean",
                    "response_top_k": "response_mean"}


@dataclass
class StudyGrid:
    """The variants to score (every combination)."""

    queries: Sequence[str] = QUERIES
    probe_kinds: Sequence[str] = ("logistic", "diff_means")
    layers: Sequence[int] | None = None  # None: every block
    damping_factors: Sequence[float] = (0.001, 0.01, 0.1, 1.0)
    top_k_share: float = 0.25  # response_top_k: the share of own answers kept


def query_concepts(adapter: ModelAdapter, direction, own: Sequence[TokenizedExample], queries: Sequence[str],
                   top_k_share: float = 0.25, batch_size: int = 16) -> dict[str, ConceptFunction]:
    """One concept function per query for ``direction``, read on ``own`` (the model's own answers to the evaluation
    prompts; the prompt queries read only their prompt tokens)."""
    out = {}
    for query in queries:
        examples = list(own)
        if query == "response_top_k":
            readout = ConceptFunction.from_directions(direction, own)
            values = concept_readouts(adapter, own, readout, batch_size, progress=False, reduction="response_mean")[:, 0]
            k = max(1, round(top_k_share * len(own)))
            examples = [own[i] for i in np.argsort(-values, kind="stable")[:k]]
        out[query] = ConceptFunction.from_directions(direction, examples, QUERY_REDUCTIONS[query])
    return out


def run_query_study(adapter: ModelAdapter, curvature: Curvature, pool: Sequence[TokenizedExample], labels: Sequence[int],
                    positive: Sequence[TokenizedExample], negative: Sequence[TokenizedExample],
                    own: Sequence[TokenizedExample], grid: StudyGrid | None = None, *, seed: int = 0,
                    batch_size: int = 8, progress: bool = True) -> dict:
    """Score every variant of ``grid`` on ``pool`` and return their retrieval metrics against ``labels``
    (``{"variants": [...], "probes": {...}}``). ``positive``/``negative`` train the probes; ``own`` holds the
    model's own answers to the evaluation prompts."""
    grid = grid or StudyGrid()
    layers = list(range(adapter.n_blocks)) if grid.layers is None else list(grid.layers)
    maps = adapter.linear_maps(max_block=max(layers))
    curvatures = {f"ekfac@{f:g}": curvature.with_damping(damping_factor=f) for f in grid.damping_factors}
    columns, queries, variants, probes = [], {m.name: [] for m in maps}, [], {}
    for layer in layers:
        hook = f"blocks.{layer}.hook_resid_post"
        acts = [collect_activations(adapter, ex, hook, progress=False) for ex in (positive, negative)]
        layer_maps = [m for m in maps if m.block <= layer]
        for kind in grid.probe_kinds:
            probe = train_probe(kind, acts[0], acts[1], hook, seed=seed)
            probes[f"{kind}@{layer}"] = probe.metrics
            for query, concept in query_concepts(adapter, probe.direction, own, grid.queries, grid.top_k_share).items():
                grads = concept.gradient(adapter, layer_maps, batch_size=batch_size)
                for name, cur in [*curvatures.items(), ("identity", None)]:
                    pre = cur.precondition(grads) if cur is not None else grads
                    for m in maps:
                        queries[m.name].append(pre[m.name][0] if m.name in pre else torch.zeros(m.shape))
                    columns.append(f"{query}|{kind}|{layer}|{name}")
                    variants.append({"query": query, "probe": kind, "layer": layer, "curvature": name})
    stacked = {name: torch.stack(q) for name, q in queries.items()}
    scores = score_with_queries(adapter, pool, maps, stacked, estimator="query_study", columns=columns, sign=-1.0,
                                batch_size=batch_size, progress=progress)
    norms = gradient_norms(adapter, pool, maps, batch_size=batch_size, progress=progress)
    rows = []
    for j, variant in enumerate(variants):
        for normalization, values in (("none", scores.values[:, j]), ("unit", scores.values[:, j] / norms)):
            m = retrieval_metrics(values, labels)
            rows.append({**variant, "normalization": normalization, "auroc": m["auroc"], "auprc": m["auprc"],
                         "precision_at_k": m["precision_at_k"]})
    return {"variants": rows, "probes": probes, "pool": len(pool), "planted": int(sum(labels))}


def _key(row: dict) -> tuple:
    return row["query"], row["probe"], row["layer"], row["curvature"], row["normalization"]


def summarise_study(studies: dict[str, dict], by: str = "query") -> list[tuple[str, float, float, float]]:
    """Mean AUROC, its minimum and mean AUPRC per value of ``by`` (e.g. ``query``) over every variant and study."""
    values: dict[str, list[tuple[float, float]]] = {}
    for study in studies.values():
        for row in study["variants"]:
            values.setdefault(str(row[by]), []).append((row["auroc"], row["auprc"]))
    return [(k, float(np.mean([a for a, _ in v])), float(np.min([a for a, _ in v])), float(np.mean([p for _, p in v])))
            for k, v in values.items()]


def format_query_table(studies: dict[str, dict], verdicts: dict[str, str] | None = None) -> str:
    """Markdown: one row per variant, AUROC / AUPRC per study (benchmark and seed), then summaries by factor, apart
    for the studies whose concept the steering check found causal (``verdicts``: study -> verdict) and the others,
    since a concept that does not drive the behaviour cannot rank the data behind it whatever the query."""
    verdicts = verdicts or {}
    names = list(studies)
    rows = {}
    for name in names:
        for row in studies[name]["variants"]:
            rows.setdefault(_key(row), {})[name] = row
    label = {n: f"{n} ({verdicts[n]})" if n in verdicts else n for n in names}
    head = ("| query | probe | block | curvature | ∇L norm | "
            + " | ".join(f"{label[n]} AUROC / AUPRC" for n in names) + " |")
    lines = [head, "|" + "---|" * (5 + len(names))]
    for key, by_study in rows.items():
        cells = [f"{by_study[n]['auroc']:.3f} / {by_study[n]['auprc']:.3f}" if n in by_study else "—" for n in names]
        lines.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    groups = {"all studies": studies}
    if verdicts:
        causal = {n: s for n, s in studies.items() if verdicts.get(n) == "causal"}
        groups = {"studies whose concept is causal": causal,
                  "studies whose concept is not causal (or unchecked)": {n: s for n, s in studies.items() if n not in causal}}
    for group, members in groups.items():
        if not members:
            continue
        for factor in ("query", "probe", "layer", "curvature", "normalization"):
            lines += ["", f"By {factor}, {group} ({', '.join(members)}), over every other choice:", "",
                      f"| {factor} | mean AUROC | min AUROC | mean AUPRC |", "|---|---|---|---|"]
            lines += [f"| {k} | {a:.3f} | {lo:.3f} | {p:.3f} |" for k, a, lo, p in summarise_study(members, factor)]
    return "\n".join(lines)
