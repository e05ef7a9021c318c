"""The audit's stages around the scores, each written to its own folder and recorded in ``run.json``:

- ``check`` (after the probe): is the concept causal? (:func:`~concept_influence.concept_check.check_concept` on
  ``concept.check_positive`` vs ``check_negative``) -> ``check/concept_check.json`` and ``.png``;
- ``explain`` (after the report, with ``[explain] sae``): the SAE latents of the top examples -> ``explain/``;
- ``filter`` (last, with ``[filter] remove_top``): the training file without the top of the ranking -> ``filter/``.

Each runs on rank 0 while the other ranks wait; a finished stage is not run again.
"""

from __future__ import annotations

from pathlib import Path

from ..data import tokenize_kept
from ..scores import Scores

__all__ = ["check_stage", "explain_stage", "filter_stage", "causal_warning"]


def check_stage(pipeline) -> Path:
    """The concept check of the run's direction on its model; its verdict, effect sizes and plot are recorded."""
    from ..concept_check import check_concept_files

    run, cfg, ranks = pipeline.run, pipeline.cfg, pipeline.ranks
    out = run.path / "check"
    direction = pipeline.direction()
    if ranks.is_main and not run.is_done("check"):
        positive, negative = cfg.check_files
        check = check_concept_files(pipeline.adapter, direction, positive, negative,
                                    lambda path, _: pipeline._tokenize(path, cfg.concept.check_max_examples), out,
                                    ("concept.check_positive", "concept.check_negative"),
                                    batch_size=cfg.scoring.batch_size)
        run.finish_stage("check", ranks, verdict=check.verdict, explanation=check.explanation(),
                         first_order=check.first_order, first_order_se=check.first_order_se,
                         separation_auroc=check.separation_auroc, threshold=check.threshold,
                         plot="check/concept_check.png", positive=positive, negative=negative)
    ranks.barrier()
    return out / "concept_check.json"


def causal_warning(record: dict, config) -> str | None:
    """The loud warning for a run whose concept is not known to be causal: its check's verdict is not, or a saved
    direction was not checked for want of texts (None when causal, or when ``concept.check = false``)."""
    check = record["stages"].get("check")
    if check is None:
        return None if not config.concept.check or config.checks_concept else (
            "WARNING: the concept was not checked: the probe is a saved direction, so there are no positive and negative "
            "texts to steer on; give concept.check_positive and check_negative to learn whether it drives the behaviour.")
    if check["verdict"] == "causal":
        return None
    return (f"WARNING: the concept is not causal for the behaviour. {check['explanation']} Set concept.require = "
            '"causal" to stop such runs before the factors.')


def explain_stage(pipeline) -> Path:
    """``explain/``: the SAE latents of the top ``explain.top_k`` examples against the first ``explain.max_examples``."""
    from probes.sae import load_sae

    from ..explain import explain_to_folder
    from ..sae_concepts import check_sae_compatible

    run, cfg, ranks = pipeline.run, pipeline.cfg, pipeline.ranks
    out = run.path / "explain"
    if ranks.is_main and not run.is_done("explain"):
        pipeline._require("scores", "score")
        e = cfg.explain
        sae = load_sae(e.sae)
        check_sae_compatible(sae, pipeline.adapter)
        scores = Scores.load(run.scores_path)
        top, scored = {i for i, _ in scores.top(e.top_k)}, set(scores.ids)
        examples = []
        for shard in pipeline.data.shards(cfg.scoring.shard_size):
            for example in tokenize_kept(shard.examples, pipeline.adapter.tokenizer, cfg.data.max_length, True)[0]:
                room = e.max_examples is None or len(examples) < e.max_examples
                if example.id in top or (room and example.id in scored):
                    examples.append(example)
        explain_to_folder(scores, sae, pipeline.adapter, examples, out, e.top_k, progress=pipeline.progress,
                          latents_per_example=e.latents_per_example)
        run.finish_stage("explain", ranks, sae=e.sae, top_k=min(e.top_k, len(examples)), examples=len(examples))
    ranks.barrier()
    return out / "explain.md"


def filter_stage(pipeline) -> Path:
    """``filter/<training file>``: the training data without the top ``filter.remove_top`` of the run's ranking (with
    ``filter.ranking = "union"``, the default, its union with the behaviour's own ranking where that was scored:
    :func:`~concept_influence.runs.stability.answer_ranking`) and its ``.filter.json`` record."""
    from ..filtering import filter_training_file
    from .stability import answer_ranking

    run, cfg, ranks = pipeline.run, pipeline.cfg, pipeline.ranks
    train = Path(cfg.data.train)
    out = run.path / "filter" / (train.name + ".parquet" if train.is_dir() else train.name)
    if ranks.is_main and not run.is_done("filter"):
        pipeline._require("scores", "score")
        r = cfg.filter.remove_top
        scores, ranking = answer_ranking(run) if cfg.filter.ranking == "union" else (run.scores_path, "scores")
        record = filter_training_file(scores, train, out, remove_top=int(r) if r >= 1 else r, overwrite=True)
        by = "" if ranking == "scores" else " by the union of the run's ranking and the behaviour's own"
        print(f"filter: removed {record['removed']} of {record['examples']} examples{by}; kept {record['kept']} in {out}")
        run.finish_stage("filter", ranks, remove_top=r, ranking=ranking, removed=record["removed"], kept=record["kept"],
                         out=str(out.relative_to(run.path)))
    ranks.barrier()
    return out
