"""The stages of a run folder in one process (one rank under ``torchrun``): the probe direction, the curvature
fitted in checkpointed passes over shards of the training data (then ``[factors] extra_data``, :mod:`.inputs`), and
the scores computed shard by shard and merged in data order; with ``[model] checkpoints``, the factors and scores at
each checkpoint (:mod:`.checkpoints`) and their weighted sum. The audit's other stages (the concept check, explain,
filter) are in :mod:`.audit`."""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import cached_property, partial
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..curvature import Curvature, SumStats, UnrolledCurvature, fisher_step_scales, fit_curvature
from ..data import ChatExample, Shard, TokenizedExample, read_tokenized, tokenize_kept
from ..distributed import Ranks
from ..estimators import ESTIMATORS, GradientEstimator
from ..fileio import path_sha256, save_tensors
from ..models import MapSelectionError, ModelAdapter, block_of_hook, checkpointed_weights, load_model
from ..models.hugging_face import parse_track
from ..provenance import combine_digests
from ..scores import Scores
from .checkpoints import Point, describe_points, load_point, model_folder, point_horizons, run_points
from .folder import Run, RunError, write_or_explain
from .inputs import RunData
from .optimizer import ADAM, read_optimizer_state
from .owners import fit_owned, uses_owners
from .partitioned import fit_partitions, run_partitions
from .report import write_report
from .shards import read_checkpoint, resume_pass
from .stability import merge_shards, require_stable, run_stability, save_shard, shard_done, summed_variants

__all__ = ["Pipeline"]


class Pipeline:
    """The stages of one run folder in one process (one rank under ``torchrun``)."""

    def __init__(self, run: Run, ranks: Ranks, progress: bool = True):
        self.run, self.ranks, self.progress = run, ranks, progress
        self.cfg = run.config
        self.data = RunData(self.cfg, self._tokenize_kept)

    # ---- inputs --------------------------------------------------------------------------------
    @cached_property
    def adapter(self) -> ModelAdapter:
        """The run's model, checked against the fingerprint the run started with."""
        model = self.cfg.model
        weights, selection = parse_track(model.track)
        adapter = load_model(model_folder(model), device=self.ranks.device, dtype=model.dtype, base=model.base,
                             track=weights)
        try:
            adapter.select(selection)
        except MapSelectionError as e:
            raise RunError(f"[model] track: {e}") from None
        if self.ranks.is_main:
            self.run.check_fingerprint("model", adapter.fingerprint())
        return adapter

    @cached_property
    def points(self) -> list[Point]:
        """Where factors and scores are computed: the model alone, or each of ``[model] checkpoints``."""
        return run_points(self.run.path, self.cfg.model)

    @cached_property
    def _own_weights(self) -> dict:
        return checkpointed_weights(self.adapter)

    @contextmanager
    def at(self, point: Point) -> Iterator[None]:
        """The model with ``point``'s weights (checked against the fingerprint recorded for it), restored after."""
        if point.source is None:
            yield
            return
        own, adapter = self._own_weights, self.adapter
        try:
            load_point(adapter, point, self.cfg.model, own)
            if self.ranks.is_main:
                self.run.check_fingerprint(f"checkpoint {point.name}", adapter.fingerprint())
            yield
        finally:
            adapter.model.load_state_dict(own, strict=False)

    def _tokenize(self, path: str, limit: int | None) -> list[TokenizedExample]:
        return read_tokenized([path], self.adapter.tokenizer, self.cfg.data.max_length, limit,
                              self.cfg.data.skip_truncated)

    def _tokenize_kept(self, examples: Sequence[ChatExample]) -> list[TokenizedExample]:
        """The examples tokenised; those cut away at ``max_length`` are skipped (counted at the merge)."""
        return tokenize_kept(examples, self.adapter.tokenizer, self.cfg.data.max_length,
                             self.cfg.data.skip_truncated)[0]

    def _require(self, stage: str, command: str) -> None:
        if not self.run.is_done(stage):
            raise RunError(f"{self.run.path}: the {stage} stage has not run yet; run `concept-influence {command} "
                           f"{self.run.path}` first (or `concept-influence run {self.run.path / 'config.json'}`)")

    # ---- concept -------------------------------------------------------------------------------
    def _require_probe(self) -> None:
        """A run whose concept is its ``[probe]``'s direction needs the probe stage first (one named by ``[concept]``
        alone has none)."""
        if self.cfg.probe is not None:
            self._require("probe", "probe train")

    def direction(self):
        """The concept direction: trained here (``probe.positive``/``negative``) or read from ``probe.direction``;
        without a ``[probe]``, the direction the concept check steers along (:func:`~..concept_spec.steering_direction`)."""
        from .probe import probe_stage

        return probe_stage(self)

    def concept(self, with_eval: bool = True):
        """f: the concept averaged over its evaluation texts (``with_eval=False`` for the fast path, which measures
        each training example on itself)."""
        from ..concept_spec import build_concept

        self._require_probe()
        return build_concept(self.run.concept_spec, self.adapter, self._tokenize, with_eval)

    # ---- factors -------------------------------------------------------------------------------
    @property
    def needs_factors(self) -> bool:
        """Whether ``scoring.estimator`` needs the run's curvature."""
        return "curvature" in ESTIMATORS[self.cfg.scoring.estimator].run_inputs

    def gate(self) -> None:
        """Stop before the expensive stages when ``concept.require = "causal"`` and the check's verdict is not."""
        if self.cfg.concept.require != "causal":
            return
        self._require("check", "run")
        check = self.run.record["stages"]["check"]
        if check["verdict"] != "causal":
            raise RunError(f"{self.run.path}: the concept check's verdict is {check['verdict']} ({check['explanation']}) "
                           'and concept.require = "causal" stops the run before the factors and scores; the check is in '
                           f"{self.run.path / 'check'}. Choose another concept, or set concept.require = \"none\" to go on")

    def curvature(self) -> Curvature | None:
        """Fit (or resume fitting) the curvature at every point, or read ``factors.path``; the curvature of the model
        itself when it has no checkpoints."""
        if self.cfg.factors.path is not None:
            return Curvature.load(self.cfg.factors.path, self.adapter)
        for point in self.points:
            self._fit(point)
        if self.ranks.is_main and not self.run.is_done("factors"):
            self.run.finish_stage("factors", self.ranks, checkpoints=describe_points(self.points), **self.data.fitted_on)
        self.ranks.barrier()
        return None if self.points[0].name else Curvature.load(self.run.factors_dir, self.adapter)

    def tracked_maps(self) -> list:
        """The maps the run's factors cover: the tracked maps of the blocks up to the concept's hook."""
        return self.adapter.linear_maps(max_block=block_of_hook((self.cfg.probe or self.cfg.concept).hook))

    def _fit(self, point: Point) -> None:
        if self.cfg.factors.strategy == ADAM:  # read from the fine-tune's optimizer.pt, not fitted
            return read_optimizer_state(self, point)
        f, final, held = self.cfg.factors, point.factors_dir, None
        self.run.check_settings("factors", self.data.fit_settings, final)
        if not (final / "curvature.json").is_file():
            self._require_probe()
            self.gate()
            with self.at(point):
                maps = self.tracked_maps()
                self.data.fit_digests()  # (unusable data is refused before the settings are saved)
                if self.ranks.is_main:
                    self.run.save_settings("factors", self.data.fit_settings, final)
                groups, owned = run_partitions(self, point, maps), uses_owners(self)
                if owned:
                    held = self.ranks.gather(fit_owned(self, point, maps, groups))
                elif groups is not None:
                    fit_partitions(self, point, maps, groups)
                else:
                    curvature = fit_curvature(self.adapter, [], maps, f.settings(), progress=False,
                                              accumulate=partial(self._accumulate, point))
            if self.ranks.is_main:
                if groups is None and not owned:
                    write_or_explain(final, lambda: curvature.save(final), "The finished passes are kept in factors/statistics/.")
                for p in (final / "partial").glob("*"):
                    p.unlink()
        if self.ranks.is_main and not self.run.is_done(point.stage("factors")):  # (also one saved just before a kill)
            saved = json.loads((final / "curvature.json").read_text())
            self.run.finish_stage(point.stage("factors"), self.ranks, strategy=saved["strategy"],
                                  n_examples=saved["n_examples"], maps=[m["name"] for m in saved["maps"]],
                                  data_sha256=path_sha256(self.cfg.data.train), **self.data.fitted_on,
                                  **({} if held is None else {"owners": held}))
        self.ranks.barrier()

    def _accumulate(self, point: Point, name: str, collect: Callable[[Sequence[TokenizedExample]], SumStats],
                    part: int | None = None, owner: Mapping[str, int] | None = None) -> SumStats:
        """One curvature pass (of partition ``part``) over this rank's shards, checkpointed after each shard, summed
        over ranks: onto every rank, or with ``owner`` (``{map: rank}``) each map's sums onto its owner only
        (:mod:`.owners`), each rank keeping its own sums (and every count)."""
        ranks, name = self.ranks, name if part is None else f"{name}-p{part:02d}"
        owned = "" if owner is None else f"-rank{ranks.rank}of{ranks.world_size}"
        done_path = point.factors_dir / "statistics" / f"{name}{owned}.safetensors"
        digests = self.data.fit_digests()
        data_digest = combine_digests(digests)
        done = read_checkpoint(done_path, ranks.device)
        finished = done is not None and done[1].get("data") == data_digest
        if ranks.agree(finished) if owner is not None else finished:
            if owner is not None:
                done[0].counts.update({k: int(v) for k, v in json.loads(done[1]["counts"]).items()})
            return done[0]
        ckpt = point.factors_dir / "partial" / f"{name}-rank{ranks.rank}of{ranks.world_size}.safetensors"
        total, start = resume_pass(ckpt, name, digests, ranks.device)
        mine = [i for i in range(len(digests)) if ranks.owns(i)]
        where = "" if point.name is None else f" at {point.name}"
        with tqdm(total=len(mine), initial=sum(i < start for i in mine), desc=f"factors{where}: {name}", unit="shard",
                  disable=not self.progress) as bar:
            for shard in self.data.fit_shards():
                if shard.index < start or not ranks.owns(shard.index):
                    continue
                examples = self._tokenize_kept(shard.examples)
                if examples:
                    total.merge(collect(examples))
                meta = {"next_shard": str(shard.index + 1), "data": combine_digests(digests[: shard.index + 1])}
                write_or_explain(ckpt, lambda: save_tensors(ckpt, total.state_dict(), meta),
                                 f"The checkpoint before shard {shard.index} is intact.")
                bar.update(1)
        total = ranks.all_reduce(total) if owner is None else ranks.reduce_to_owners(total, owner)
        if not total.counts:
            raise RunError(f"{self.data.fit_source}: every example was skipped; nothing to fit the curvature on")
        if ranks.is_main or owner is not None:
            meta = {"data": data_digest, **({} if owner is None else {"counts": json.dumps(total.counts)})}
            write_or_explain(done_path, lambda: save_tensors(done_path, total.state_dict(), meta),
                             "The per-rank checkpoints are intact.")
        ranks.barrier()
        return total

    # ---- scores --------------------------------------------------------------------------------
    def estimator(self, point: Point | None = None):
        """The estimator ``scoring.estimator`` names, made from what its registry entry says a run passes it (the
        curvature of ``point``, default the model's own); a gradient estimator also scores its stability variants and
        the ranking of the behaviour's own examples (``cfg.behaviour_file``)."""
        cls = ESTIMATORS[self.cfg.scoring.estimator]
        inputs = {"readout": lambda: self.concept(with_eval=False), "concept": self.concept,
                  "curvature": lambda: self._scoring_curvature(point or self.points[0])}
        options = {"scoring": self.cfg.scoring.settings(), "variants": True,
                   "behaviour": self._behaviour_examples} if issubclass(cls, GradientEstimator) else {}
        return cls(*(inputs[name]() for name in cls.run_inputs), **options)

    @cached_property
    def _behaviour_examples(self) -> list[TokenizedExample] | None:
        """The behaviour's own examples (``cfg.behaviour_file``), read once for every checkpoint."""
        path = self.cfg.behaviour_file
        return path and self._tokenize(path, self.cfg.concept.check_max_examples)

    @cached_property
    def _horizons(self) -> tuple[list, int]:
        """Each checkpoint's horizon and the fine-tune's batch size, read once from ``trainer_state.json``."""
        horizons, batch_size = point_horizons(self.points, self.cfg.model)
        batch_size = self.cfg.scoring.train_batch_size or batch_size
        if not batch_size:
            raise RunError("scoring.unrolled: trainer_state.json records no train_batch_size; give "
                           "scoring.train_batch_size")
        return horizons, batch_size

    def _scoring_curvature(self, point: Point) -> Curvature:
        if self.cfg.factors.path is not None:
            curvature = Curvature.load(self.cfg.factors.path, self.adapter)
        else:
            self._require(point.stage("factors"), "fit-factors")
            curvature = Curvature.load(point.factors_dir, self.adapter)
        if not self.cfg.scoring.unrolled:
            return curvature
        horizons, batch_size = self._horizons
        return UnrolledCurvature.from_curvature(curvature, horizons[self.points.index(point)],
                                                step_scales=fisher_step_scales(curvature, batch_size))

    def scores(self) -> Scores:
        """Score every training example at every point, shard by shard (resuming), merged in data order; with
        checkpoints, their weighted sum (what ``sum-scores`` writes) is the run's scores."""
        parts = [self._score_point(point) for point in self.points]
        run, ranks = self.run, self.ranks
        if self.points[0].name and ranks.is_main and not (run.scores_path.is_file() and run.is_done("scores")):
            weights, name = [p.weight for p in self.points], f"{parts[0].estimator}[checkpoints]"
            total = Scores.weighted_sum(parts, weights, estimator=name, metadata={
                **parts[0].metadata, "summed": [str(p.scores_path) for p in self.points], "weights": weights})
            variants = summed_variants(run, self.points, weights, name)  # (written before the scores)
            write_or_explain(run.scores_path, lambda: total.save(run.scores_path), "The scores at each checkpoint are intact.")
            stability = run_stability(total, variants, {p.name: part for p, part in zip(self.points, parts)})
            run.finish_stage("scores", ranks, estimator=total.estimator, n_examples=len(total),
                             checkpoints=describe_points(self.points), data_sha256=path_sha256(self.cfg.data.train),
                             stability=stability and stability.to_dict())
        ranks.barrier()
        require_stable(run, self.cfg.scoring.require, ranks.is_main)
        return Scores.load(run.scores_path)

    def _score_point(self, point: Point) -> Scores:
        s, ranks = self.cfg.scoring, self.ranks
        settings = {k: v for k, v in s.to_dict().items() if k != "require"}  # a gate: it changes no score
        self.run.check_settings("scores", settings, point.scores_dir)
        if point.scores_path.is_file() and self.run.is_done(point.stage("scores")):
            return Scores.load(point.scores_path)
        self.gate()
        with self.at(point):
            estimator = self.estimator(point)
            n_shards = len(self.data.digests(s.shard_size))
            if ranks.is_main:
                self.run.save_settings("scores", settings, point.scores_dir)
            mine = sum(ranks.owns(i) for i in range(n_shards))
            written = 0
            where = "" if point.name is None else f" at {point.name}"
            with tqdm(total=mine, desc=f"score {estimator.name}{where}", unit="shard", disable=not self.progress) as bar:
                for shard in self.data.shards(s.shard_size):
                    if not ranks.owns(shard.index):
                        continue
                    if not shard_done(point, shard.index, shard.digest, estimator.variants):
                        save_shard(point, shard.index, *self._score_shard(estimator, shard),
                                   f"The {written} shards this process finished before it are intact.")
                    written += 1
                    bar.update(1)
        ranks.barrier()
        if ranks.is_main:
            merged, variants = merge_shards(point, self.data.digests(s.shard_size), estimator.name, estimator.variants)
            stability = run_stability(merged, variants)
            self.run.finish_stage(point.stage("scores"), ranks, estimator=estimator.name, n_examples=len(merged),
                                  n_shards=n_shards, n_skipped=merged.metadata["n_skipped"],
                                  data_sha256=path_sha256(self.cfg.data.train), stability=stability and stability.to_dict())
        ranks.barrier()
        return Scores.load(point.scores_path)

    def _score_shard(self, estimator, shard: Shard) -> tuple[Scores, Scores | None]:
        """The scores of one shard's examples (none when all were skipped), tagged with the shard's digest, and the
        scores of the estimator's stability variants (none when all were skipped)."""
        examples = self._tokenize_kept(shard.examples)
        result = (estimator.score(self.adapter, examples, batch_size=self.cfg.scoring.batch_size, progress=False)
                  if examples else Scores([], np.zeros((0, estimator.concept.k)), estimator.name,
                                          estimator.concept.names))
        result.metadata.update(shard_digest=shard.digest, shard=shard.index, n_lines=len(shard.examples))
        return result, estimator.variants_ if examples else None

    # ---- report --------------------------------------------------------------------------------
    def report(self, top_k: int | None = None) -> Path:
        """``report/report.md``: the check's verdict, the top and bottom ``top_k`` examples with their text (and score at
        each checkpoint), and the score distribution."""
        self._require("scores", "score")
        k = top_k or self.cfg.report.top_k
        path = write_report(self.run, k, [p for p in self.points if p.name])
        self.run.finish_stage("report", self.ranks, top_k=k)
        return path
