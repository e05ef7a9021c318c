"""The stages of a run folder in one process (one rank under ``torchrun``): the probe direction, the curvature
fitted in checkpointed passes over shards of the training data, and the scores computed shard by shard and
merged in data order."""

from __future__ import annotations

import json
import warnings
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..curvature import Curvature, SumStats, fit_curvature
from ..data import Shard, TokenizedExample, iter_shards, load_chats, tokenize_examples, tokenize_kept
from ..distributed import Ranks
from ..estimators import ESTIMATORS, GradientEstimator
from ..fileio import atomic_write_text, load_tensors_and_metadata, path_sha256, save_tensors
from ..models import ModelAdapter, block_of_hook, load_model
from ..provenance import combine_digests
from ..scores import Scores
from .folder import Run, RunError, write_or_explain
from .report import write_report

__all__ = ["Pipeline"]


class Pipeline:
    """The stages of one run folder in one process (one rank under ``torchrun``)."""

    def __init__(self, run: Run, ranks: Ranks, progress: bool = True):
        self.run, self.ranks, self.progress = run, ranks, progress
        self.cfg = run.config
        self._digests: dict[tuple[int, int | None], list[str]] = {}

    # ---- inputs --------------------------------------------------------------------------------
    @cached_property
    def adapter(self) -> ModelAdapter:
        """The run's model, checked against the fingerprint the run started with."""
        model = self.cfg.model
        adapter = load_model(model.path, device=self.ranks.device, dtype=model.dtype, base=model.base, track=model.track)
        if self.ranks.is_main:
            self.run.check_fingerprint("model", adapter.fingerprint())
        return adapter

    def _tokenize(self, path: str, limit: int | None) -> list[TokenizedExample]:
        return tokenize_examples(load_chats(path, limit), self.adapter.tokenizer, self.cfg.data.max_length,
                                 self.cfg.data.skip_truncated, source=path)

    def _tokenize_shard(self, shard: Shard) -> list[TokenizedExample]:
        """The shard's examples, tokenised; those cut away at ``max_length`` are skipped (counted at the merge)."""
        return tokenize_kept(shard.examples, self.adapter.tokenizer, self.cfg.data.max_length,
                             self.cfg.data.skip_truncated)[0]

    def _shards(self, shard_size: int, limit: int | None = None):
        return iter_shards(self.cfg.data.train, shard_size, limit)

    def _shard_digests(self, shard_size: int, limit: int | None = None) -> list[str]:
        """The SHA-256 of each shard's records (read once per process and shard layout)."""
        key = (shard_size, limit)
        if key not in self._digests:
            self._digests[key] = [shard.digest for shard in self._shards(shard_size, limit)]
            if not self._digests[key]:
                raise RunError(f"{self.cfg.data.train}: the file has no examples")
        return self._digests[key]

    def _require(self, stage: str, command: str) -> None:
        if not self.run.is_done(stage):
            raise RunError(f"{self.run.path}: the {stage} stage has not run yet; run `concept-influence {command} "
                           f"{self.run.path}` first (or `concept-influence run {self.run.path / 'config.json'}`)")

    # ---- probe ---------------------------------------------------------------------------------
    def direction(self):
        """The concept direction: trained here (``probe.positive``/``negative``) or read from ``probe.direction``."""
        from probes import ConceptDirection

        from ..concepts import check_direction_compatible

        path = self.run.direction_path
        if self.ranks.is_main and not self.run.is_done("probe"):
            details = {}
            if not path.is_file():  # (a direction saved just before a kill is kept)
                details = self._make_direction(path)
            self.run.finish_stage("probe", self.ranks, hook=self.cfg.probe.hook, **details)
        self.ranks.barrier()
        direction = ConceptDirection.load(path)
        check_direction_compatible(direction, self.adapter)
        return direction

    def _make_direction(self, path: Path) -> dict:
        from probes import ConceptDirection, train_probe

        from ..activations import collect_activations
        from ..concepts import check_direction_compatible

        p = self.cfg.probe
        if p.direction is not None:
            direction, details = ConceptDirection.load(p.direction), {"source": p.direction}
            if direction.hook_name != p.hook:
                raise RunError(f"{p.direction}: the direction is for hook {direction.hook_name!r}, "
                               f"the config says probe.hook = {p.hook!r}")
            check_direction_compatible(direction, self.adapter)
        else:
            self.adapter.check_hook(p.hook)
            acts = [collect_activations(self.adapter, self._tokenize(f, p.max_examples), p.hook, p.reduction,
                                        progress=self.progress) for f in (p.positive, p.negative)]
            result = train_probe(p.kind, *acts, p.hook, seed=p.seed)
            direction, details = result.direction, {"metrics": result.metrics}
            atomic_write_text(path.parent / "metrics.json", json.dumps(result.metrics, indent=1) + "\n")
        write_or_explain(path, lambda: direction.save(path), "Nothing else was written.")
        return details

    def concept(self, with_eval: bool = True):
        """f: the projection on the probe direction, averaged over the concept's evaluation texts
        (``with_eval=False`` for the fast path, which measures each training example on itself)."""
        from ..concepts import ConceptFunction

        self._require("probe", "probe train")
        eval_examples = self._tokenize(self.cfg.concept_eval, self.cfg.concept.max_examples) if with_eval else None
        return ConceptFunction.from_directions(self.direction(), eval_examples, self.cfg.concept.reduction)

    # ---- factors -------------------------------------------------------------------------------
    @property
    def needs_factors(self) -> bool:
        """Whether ``scoring.estimator`` needs the run's curvature."""
        return "curvature" in ESTIMATORS[self.cfg.scoring.estimator].run_inputs

    def curvature(self) -> Curvature:
        """Fit (or resume fitting) the curvature, or read ``factors.path``; checked against the model."""
        f = self.cfg.factors
        if f.path is not None:
            return Curvature.load(f.path, self.adapter)
        final = self.run.factors_dir
        self.run.check_settings("factors", f.to_dict())
        if not (final / "curvature.json").is_file():
            self._require("probe", "probe train")
            hook = self.direction().hook_name
            maps = self.adapter.linear_maps(max_block=block_of_hook(hook))
            if self.ranks.is_main:
                self.run.save_settings("factors", f.to_dict())
            curvature = fit_curvature(self.adapter, [], maps, f.settings(), progress=False, accumulate=self._accumulate)
            if self.ranks.is_main:
                write_or_explain(final, lambda: curvature.save(final),
                                 "The finished passes are kept in factors/statistics/.")
                for p in (final / "partial").glob("*"):
                    p.unlink()
        if self.ranks.is_main and not self.run.is_done("factors"):  # (also a curvature saved just before a kill)
            saved = json.loads((final / "curvature.json").read_text())
            self.run.finish_stage("factors", self.ranks, strategy=saved["strategy"], n_examples=saved["n_examples"],
                                  maps=[m["name"] for m in saved["maps"]], data_sha256=path_sha256(self.cfg.data.train))
        self.ranks.barrier()
        return Curvature.load(final, self.adapter)

    def _accumulate(self, name: str, collect: Callable[[Sequence[TokenizedExample]], SumStats]) -> SumStats:
        """One curvature pass over this rank's shards, checkpointed after each shard, summed over ranks."""
        f, ranks = self.cfg.factors, self.ranks
        done_path = self.run.factors_dir / "statistics" / f"{name}.safetensors"
        digests = self._shard_digests(f.shard_size, f.max_examples)
        data_digest = combine_digests(digests)
        done = _read_checkpoint(done_path, ranks.device)
        if done is not None and done[1].get("data") == data_digest:
            return done[0]
        ckpt = self.run.factors_dir / "partial" / f"{name}-rank{ranks.rank}of{ranks.world_size}.safetensors"
        total, start = _resume_pass(ckpt, name, digests, ranks.device)
        mine = [i for i in range(len(digests)) if ranks.owns(i)]
        with tqdm(total=len(mine), initial=sum(i < start for i in mine), desc=f"factors: {name}", unit="shard",
                  disable=not self.progress) as bar:
            for shard in self._shards(f.shard_size, f.max_examples):
                if shard.index < start or not ranks.owns(shard.index):
                    continue
                examples = self._tokenize_shard(shard)
                if examples:
                    total.merge(collect(examples))
                meta = {"next_shard": str(shard.index + 1), "data": combine_digests(digests[: shard.index + 1])}
                write_or_explain(ckpt, lambda: save_tensors(ckpt, total.state_dict(), meta),
                                 f"The checkpoint before shard {shard.index} is intact.")
                bar.update(1)
        total = ranks.all_reduce(total)
        if not total.sums:
            raise RunError(f"{self.cfg.data.train}: every example was skipped; nothing to fit the curvature on")
        if ranks.is_main:
            write_or_explain(done_path, lambda: save_tensors(done_path, total.state_dict(), {"data": data_digest}),
                             "The per-rank checkpoints are intact.")
        ranks.barrier()
        return total

    # ---- scores --------------------------------------------------------------------------------
    def estimator(self):
        """The estimator ``scoring.estimator`` names, made from what its registry entry says a run passes it."""
        cls = ESTIMATORS[self.cfg.scoring.estimator]
        inputs = {"readout": lambda: self.concept(with_eval=False), "concept": self.concept,
                  "curvature": self._scoring_curvature}
        options = {"scoring": self.cfg.scoring.settings()} if issubclass(cls, GradientEstimator) else {}
        return cls(*(inputs[name]() for name in cls.run_inputs), **options)

    def _scoring_curvature(self) -> Curvature:
        if self.cfg.factors.path is None:
            self._require("factors", "fit-factors")
        return self.curvature()

    def scores(self) -> Scores:
        """Score every training example shard by shard (resuming), then merge the shards in data order."""
        s, ranks = self.cfg.scoring, self.ranks
        self.run.check_settings("scores", s.to_dict())
        if self.run.scores_path.is_file() and self.run.is_done("scores"):
            return Scores.load(self.run.scores_path)
        estimator = self.estimator()
        n_shards = len(self._shard_digests(s.shard_size))
        if ranks.is_main:
            self.run.save_settings("scores", s.to_dict())
        mine = sum(ranks.owns(i) for i in range(n_shards))
        written = 0
        with tqdm(total=mine, desc=f"score {estimator.name}", unit="shard", disable=not self.progress) as bar:
            for shard in self._shards(s.shard_size):
                if not ranks.owns(shard.index):
                    continue
                path = self.run.shard_path(shard.index)
                if _finished_shard(path, shard.digest) is None:
                    result = self._score_shard(estimator, shard)
                    write_or_explain(path, lambda: result.save(path),
                                     f"The {written} shards this process finished before it are intact.")
                written += 1
                bar.update(1)
        ranks.barrier()
        if ranks.is_main:
            merged = self._merge_shards(estimator.name)
            write_or_explain(self.run.scores_path, lambda: merged.save(self.run.scores_path), "Every shard is intact.")
            self.run.finish_stage("scores", ranks, estimator=estimator.name, n_examples=len(merged), n_shards=n_shards,
                                  n_skipped=merged.metadata["n_skipped"],
                                  data_sha256=path_sha256(self.cfg.data.train))
        ranks.barrier()
        return Scores.load(self.run.scores_path)

    def _score_shard(self, estimator, shard: Shard) -> Scores:
        """The scores of one shard's examples (none when all were skipped), tagged with the shard's digest."""
        examples = self._tokenize_shard(shard)
        result = (estimator.score(self.adapter, examples, batch_size=self.cfg.scoring.batch_size, progress=False)
                  if examples else Scores([], np.zeros((0, estimator.concept.k)), estimator.name,
                                          estimator.concept.names))
        result.metadata.update(shard_digest=shard.digest, shard=shard.index, n_lines=len(shard.examples))
        return result

    def _merge_shards(self, estimator: str) -> Scores:
        parts = []
        for index, digest in enumerate(self._shard_digests(self.cfg.scoring.shard_size)):
            path = self.run.shard_path(index)
            part = _finished_shard(path, digest)
            if part is None:
                raise RunError(f"{path}: missing or stale shard; run the same command again to compute it")
            parts.append(part)
        return _concatenate(parts, estimator)

    # ---- report --------------------------------------------------------------------------------
    def report(self, top_k: int | None = None) -> Path:
        """``report/report.md``: the top and bottom ``top_k`` examples with their text, and the score distribution."""
        self._require("scores", "score")
        k = top_k or self.cfg.report.top_k
        path = write_report(self.run, k)
        self.run.finish_stage("report", self.ranks, top_k=k)
        return path


def _concatenate(parts: Sequence[Scores], estimator: str) -> Scores:
    """Shards in data order as one :class:`Scores` (per-module and per-token shares too, when kept); the
    metadata notes how many lines were skipped (responses cut away at ``data.max_length``)."""
    ids = [i for part in parts for i in part.ids]
    metadata = {k: v for k, v in parts[-1].metadata.items() if k not in ("shard_digest", "shard", "n_lines")}
    metadata["n_skipped"] = sum(part.metadata["n_lines"] for part in parts) - len(ids)
    kept = [part for part in parts if len(part)]
    per_module = per_token = None
    if kept and kept[0].per_module is not None:
        per_module = {name: np.concatenate([p.per_module[name] for p in kept]) for name in kept[0].per_module}
    if kept and kept[0].per_token is not None:
        per_token = {i: v for p in kept for i, v in p.per_token.items()}
    return Scores(ids, np.concatenate([part.values for part in parts]), estimator, parts[-1].columns, metadata,
                  per_module, per_token)


def _finished_shard(path: Path, digest: str) -> Scores | None:
    """The shard saved at ``path`` if it was computed from input records with this ``digest``; None when it is
    missing, stale, or unreadable (with a warning: it is computed again)."""
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None
    try:
        shard = Scores.load(path)
    except (ValueError, KeyError, UnicodeDecodeError):
        warnings.warn(f"{path}: unreadable shard; it is computed again")
        return None
    return shard if shard.metadata.get("shard_digest") == digest else None


def _read_checkpoint(path: Path, device: str) -> tuple[SumStats, dict[str, str]] | None:
    """A curvature checkpoint and its metadata, on ``device`` (where the pass goes on adding to it); None (with a
    warning) when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        tensors, metadata = load_tensors_and_metadata(path, RunError, device)
        return SumStats.from_state_dict(tensors), metadata
    except (RunError, KeyError) as e:
        warnings.warn(f"{path}: unreadable checkpoint ({e}); its pass starts over")
        return None


def _resume_pass(ckpt: Path, name: str, digests: Sequence[str], device: str) -> tuple[SumStats, int]:
    """The sums of pass ``name`` so far from this rank's checkpoint (on ``device``) and the first shard still to do;
    an empty start when there is no checkpoint, or when the data changed since it was written (with a warning)."""
    resumed = _read_checkpoint(ckpt, device)
    if resumed is None:
        return SumStats(), 0
    start = int(resumed[1].get("next_shard", 0))
    if resumed[1].get("data") == combine_digests(digests[:start]):
        return resumed[0], start
    warnings.warn(f"{ckpt}: the training data changed since this checkpoint; pass {name!r} starts over")
    return SumStats(), 0
