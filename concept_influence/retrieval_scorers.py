"""Exact scorers for :func:`concept_influence.retrieval.certified_retrieval`: callables that take an array of
indices and return their exact scores, from a known array, an estimator, or a run folder's estimator."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["array_scorer", "estimator_scorer", "run_scorer", "run_examples_scorer"]


def array_scorer(values, counter: list | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """An exact scorer reading a known array (benchmarks, tests, or exact scores computed elsewhere); when
    ``counter`` is a list, every call appends the indices it was asked for."""
    values = np.asarray(values, dtype=np.float64)

    def score(indices: np.ndarray) -> np.ndarray:
        if counter is not None:
            counter.append(np.asarray(indices).copy())
        return values[np.asarray(indices, dtype=np.int64)]

    return score


def estimator_scorer(estimator, adapter, examples: Sequence, column: int | str = 0, batch_size: int = 8,
                     progress: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """An exact scorer from an estimator (e.g. :class:`ConceptInfluence`, :class:`OverCheckpoints`): scores only
    the chosen examples, ``estimator.score(adapter, [examples[i] for i in indices])``, and returns one column. Give
    a gradient estimator its fitted :class:`Curvature` (or ``fit_examples``): with a strategy name alone it would fit
    the curvature on the chosen examples only."""

    def score(indices: np.ndarray) -> np.ndarray:
        chosen = [examples[int(i)] for i in indices]
        return estimator.score(adapter, chosen, batch_size=batch_size, progress=progress).column(column)

    return score


def run_scorer(run, ids: Sequence[str], column: int | str = 0, progress: bool = False
               ) -> Callable[[np.ndarray], np.ndarray]:
    """An exact scorer from a run folder: its ``scoring.estimator`` (at each of its ``[model] checkpoints``,
    weighted as the run sums them) on the chosen examples only; ``column="union"``: two columns, the run's scores
    (column 0) and the behaviour's own ranking scored in the same pass (``[scoring] behaviour``), whose union the
    run answers with (:func:`~concept_influence.runs.stability.answer_ranking`), for
    :func:`~concept_influence.retrieval.certified_retrieval` to retrieve both at once. Position i of the first
    stage is the example with id ``ids[i]`` (e.g. the ids of a first-stage :class:`Scores` file of the same data: the
    run's fast path, an index query); the run's probe (and factors, for a gradient estimator) must be there. Each
    call makes one pass over the data to read and tokenise the chosen examples, then scores only them."""
    return _pipeline_scorer(_run_pipeline(run, progress), ids, column, progress)


def run_examples_scorer(run, column: int | str = 0, progress: bool = False
                        ) -> tuple[list, Callable[[np.ndarray], np.ndarray]]:
    """The chats of a run folder's training data that its scoring keeps (those cut away at ``max_length`` skipped), in
    the data's order (e.g. for a learned first stage's text features), and an exact scorer of them by position, as
    :func:`run_scorer`'s: one pipeline, so the data is read and tokenised once and the model loaded once."""
    pipeline = _run_pipeline(run, progress)
    kept, tokenized = [], []
    for shard in pipeline.data.shards(pipeline.cfg.scoring.shard_size):
        shard_tokenized = pipeline._tokenize_kept(shard.examples)
        by_id = {e.id: e for e in shard.examples}
        kept += [by_id[ex.id] for ex in shard_tokenized]
        tokenized += shard_tokenized
    return kept, _pipeline_scorer(pipeline, [c.id for c in kept], column, progress, tokenized=tokenized)


def _run_pipeline(run, progress: bool):
    from .distributed import Ranks
    from .runs import Pipeline, Run

    return Pipeline(Run.open(run, create=False), Ranks(device=_run_device(run)), progress)


def _pipeline_scorer(pipeline, ids: Sequence[str], column: int | str, progress: bool,
                     tokenized: Sequence | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The scorer of :func:`run_scorer`; with ``tokenized`` (the kept examples of ``ids``, tokenised, in order) the
    chosen ones are taken from it instead of found by a pass over the data."""
    from .runs import RunError

    cfg = pipeline.cfg
    ids = list(ids)

    def chosen(indices: np.ndarray) -> list:
        if tokenized is not None:
            return [tokenized[int(i)] for i in indices]
        wanted = {ids[int(i)] for i in indices}
        found = {}
        for shard in pipeline.data.shards(cfg.scoring.shard_size):
            for ex in pipeline._tokenize_kept([e for e in shard.examples if e.id in wanted]):
                found[ex.id] = ex
        missing = [ids[int(i)] for i in indices if ids[int(i)] not in found]
        if missing:
            raise RunError(f"{pipeline.run.path}: {len(missing)} chosen examples are not in the run's training data "
                           f"(first: {missing[0]}); the first stage must score the run's data")
        return [found[ids[int(i)]] for i in indices]

    def columns(estimator, scores) -> np.ndarray:
        if column != "union":
            return scores.column(column)
        variants = estimator.variants_
        if variants is None or "behaviour" not in variants.columns:
            raise RunError(f"{pipeline.run.path}: the union needs the behaviour's own ranking, and this run scores no "
                           f"behaviour examples ([scoring] behaviour, by default the concept check's positive file)")
        return np.stack([scores.column(0), variants.column("behaviour")], axis=1)

    def score(indices: np.ndarray) -> np.ndarray:
        examples = chosen(indices)
        pipeline.gate()
        total = 0.0
        for point in pipeline.points:
            with pipeline.at(point):
                estimator = pipeline.estimator(point)
                values = columns(estimator, estimator.score(pipeline.adapter, examples,
                                                            batch_size=cfg.scoring.batch_size, progress=progress))
            total = total + (values if point.name is None else point.weight * values)
        return np.asarray(total, dtype=np.float64)

    return score


def _run_device(run) -> str:
    from .runs import Run

    device = Run.open(run, create=False).config.model.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device
