"""The stability check of a run folder's scores: is the top of the run's ranking the same under the choices nothing
in the data fixed?

A gradient estimator scores, in the run's one pass over the data, the concept's query preconditioned by each
stability variant of the run's curvature as extra query columns
(:func:`~concept_influence.curvature.stability_variants`: the same factors at damping × 0.01, × 0.1, × 10 and × 100,
or horizon ÷ 10 and × 10 for an unrolled curvature, and identity curvature, the plain concept gradient dot). Their
scores are kept beside the run's, which keep one column per concept: ``scores/shards/variants-NNNNNN.*`` shard by
shard and ``scores/variants.safetensors`` merged (columns ``variant:concept``; with ``[model] checkpoints``, at each
checkpoint and their weighted sum at the run's root). The run's ranking is compared with each variant and each
checkpoint's part of the sum (:func:`~concept_influence.stability.check_stability`); ``run.json`` and the report hold
the result, and ``[scoring] require = "stable"`` stops the run after the scores when a variant disagrees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from ..scores import Scores
from ..stability import StabilityReport, check_stability, union_ranking
from .folder import Layout, Run, RunError, write_or_explain
from .shards import concatenate, finished_shard

__all__ = ["variants_path", "shard_done", "save_shard", "merge_shards", "summed_variants", "run_stability",
           "require_stable", "answer_ranking"]

_SHARD_KEYS = ("shard_digest", "shard", "n_lines")


def variants_path(layout: Layout) -> Path:
    """``scores/variants.safetensors``: the variants' scores of every shard merged in data order."""
    return layout.scores_dir / "variants.safetensors"


def _variant_shard(layout: Layout, index: int) -> Path:
    return layout.scores_dir / "shards" / f"variants-{index:06d}.safetensors"


def shard_done(layout: Layout, index: int, digest: str, variants: bool) -> bool:
    """Whether shard ``index`` is scored for its input records (``digest``), with ``variants`` the variants too (a
    shard whose examples were all skipped has none)."""
    done = finished_shard(layout.shard_path(index), digest)
    return done is not None and (not variants or not len(done)
                                 or finished_shard(_variant_shard(layout, index), digest) is not None)


def save_shard(layout: Layout, index: int, result: Scores, variants: Scores | None, kept: str) -> None:
    """Write the variants' scores of shard ``index`` (tagged as ``result`` is), then its own: a shard counts as done
    once its own are written."""
    if variants is not None:
        variants.metadata.update({k: result.metadata[k] for k in _SHARD_KEYS})
        path = _variant_shard(layout, index)
        write_or_explain(path, lambda: variants.save(path), kept)
    path = layout.shard_path(index)
    write_or_explain(path, lambda: result.save(path), kept)


def _finished(path: Path, digest: str) -> Scores:
    part = finished_shard(path, digest)
    if part is None:
        raise RunError(f"{path}: missing or stale shard; run the same command again to compute it")
    return part


def merge_shards(layout: Layout, digests: Sequence[str], estimator: str, variants: bool) -> tuple[Scores, Scores | None]:
    """Every shard's scores merged in data order and, with ``variants``, the variants' scores of every shard with
    examples; both written (the variants' first), and returned."""
    parts = [_finished(layout.shard_path(i), digest) for i, digest in enumerate(digests)]
    merged, merged_variants = concatenate(parts, estimator), None
    found = [_finished(_variant_shard(layout, i), digest) for i, (digest, part) in enumerate(zip(digests, parts))
             if variants and len(part)]
    if found:
        merged_variants = concatenate(found, estimator)
        del merged_variants.metadata["n_skipped"]  # (counted in the scores' own metadata)
        path = variants_path(layout)
        write_or_explain(path, lambda: merged_variants.save(path), "Every shard is intact.")
    write_or_explain(layout.scores_path, lambda: merged.save(layout.scores_path), "Every shard is intact.")
    return merged, merged_variants


def summed_variants(run: Run, points: Sequence[Layout], weights: Sequence[float], estimator: str) -> Scores | None:
    """The weighted sum of the variants' scores at each checkpoint, written as the run's; None when a checkpoint has
    none (an estimator without a curvature)."""
    paths = [variants_path(p) for p in points]
    if not all(p.is_file() for p in paths):
        return None
    parts = [Scores.load(p) for p in paths]
    total = Scores.weighted_sum(parts, weights, estimator=estimator, metadata=parts[0].metadata)
    path = variants_path(run)
    write_or_explain(path, lambda: total.save(path), "The variants' scores at each checkpoint are intact.")
    return total


def run_stability(scores: Scores, variants: Scores | None,
                  parts: Mapping[str, Scores] | None = None) -> StabilityReport | None:
    """The stability check of the ranking by ``scores``' first column against the same column of each variant and
    against each checkpoint's part (``{name: scores}``) of a sum; None when there is nothing to compare it with."""
    kinds = dict(variants.metadata["variants"]) if variants is not None else {}
    if variants is not None:
        _same_examples(scores, variants)
    compared = {v: variants.column(v if kind == "behaviour" else f"{v}:{scores.columns[0]}") for v, kind in kinds.items()}
    for name, part in (parts or {}).items():
        compared[f"part {name}"], kinds[f"part {name}"] = part.column(0), "part"
    if not compared or len(scores) < 2:
        return None
    return check_stability(scores.column(0), compared, name=scores.estimator, kinds=kinds)


def require_stable(run: Run, require: str, is_main: bool) -> None:
    """Print the stability check's warning of the run's scores, or with ``require = "stable"`` stop with it (one
    line; the scores stay on disk)."""
    stability = run.record["stages"].get("scores", {}).get("stability")
    warning = stability and stability["warning"]
    if not warning:
        return
    if require == "stable":
        raise RunError(f"{warning}; the scores are kept in {run.scores_path}. Compare the variants' rankings in the "
                       'report, or set scoring.require = "none" to go on')
    if is_main:
        print(warning)


def _same_examples(scores: Scores, variants: Scores) -> None:
    if variants.ids != scores.ids:
        raise RunError(f"the variants' scores ({len(variants)} examples) and the run's ({len(scores)}) are not of "
                       "the same examples; delete scores/ and score again")


def answer_ranking(run: Run, scores: Scores | None = None) -> tuple[Scores, str]:
    """The ranking a run answers with, and which it is: where the behaviour's own ranking was scored beside the run's
    (``scoring.behaviour``), their union (:func:`~concept_influence.stability.union_ranking`: each example by its best
    place in either, ``"union"``), else the run's own scores (``"scores"``). Over the emergent family the concept's
    ranking fell below AUROC 0.8 on 6 of 43 runs and the behaviour's on 1; their union on none
    (``benchmarks/family``). ``scores``: the run's own, when already read."""
    scores = Scores.load(run.scores_path) if scores is None else scores
    path = variants_path(run)
    variants = Scores.load(path) if path.is_file() else None
    if variants is None or "behaviour" not in variants.columns:
        return scores, "scores"
    _same_examples(scores, variants)
    union = union_ranking(scores.column(0), variants.column("behaviour"))
    return Scores(scores.ids, union[:, None], f"union of {scores.estimator} and the behaviour's own ranking",
                  [f"union:{scores.columns[0]}"], metadata={"union_of": [scores.columns[0], "behaviour"]}), "union"
