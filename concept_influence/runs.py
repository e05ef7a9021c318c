"""Run folders that describe themselves, and the pipeline that fills them: probe → factors → scores → report.

A run folder holds::

    config.json          the resolved config; `concept-influence run RUN/config.json` replays the run
    run.json             format version, package versions, model and data fingerprints, a log of stages
    manifest.json        every finished file with its size and SHA-256
    probe/               direction.safetensors + .json (and metrics.json when trained here)
    factors/             curvature.safetensors + curvature.json; statistics/ the summed covariance and
                         eigenvalue statistics of each pass; partial/ per-rank checkpoints while fitting
    scores/shards/       shard-000000.safetensors + .json, one per `scoring.shard_size` examples
    scores/scores.*      all shards merged in data order
    report/              report.md (top and bottom examples with their text) and score_distribution.png

Every file is written atomically (temporary file + rename). Work is done shard by shard and each finished
shard is on disk, so a run killed at any point (even SIGKILL) and started again continues from the last
finished shard and ends with the same result, bit for bit. A shard is reused only when the SHA-256 of its
input lines is unchanged. Under ``torchrun`` shards are dealt to ranks and curvature statistics are summed
over ranks (:mod:`concept_influence.distributed`).
"""

from __future__ import annotations

import errno
import json
import platform
import sys
import time
import warnings
from functools import cached_property
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from .config import ConfigError, RunConfig
from .curvature import Curvature, SumStats, fit_curvature
from .data import Shard, TokenizedExample, iter_shards, load_chat_jsonl, tokenize_examples, tokenize_kept
from .distributed import Ranks, process_group
from .fileio import atomic_write_text, file_sha256, load_tensors_and_metadata, save_tensors
from .models import ModelAdapter, block_of_hook, load_model
from .scores import Scores

__all__ = ["RunError", "Run", "Pipeline", "run_config", "run_stages", "RUN_FORMAT_VERSION", "STAGES"]

RUN_FORMAT = "concept-influence-run"
RUN_FORMAT_VERSION = 1
PACKAGES = ("concept-influence", "torch", "transformer-lens", "sae-lens", "transformers", "scikit-learn", "numpy",
            "safetensors", "tokenizers")
STAGES = ("probe", "factors", "scores", "report")


class RunError(RuntimeError):
    """A run folder cannot be used or a stage cannot go on; what is already on disk stays valid."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: invalid JSON ({e})") from None


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


class Run:
    """A run folder: its config, its record (``run.json``) and where each stage's files go."""

    def __init__(self, path: Path, config: RunConfig):
        self.path = path
        self.config = config

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, config: RunConfig | None = None, create: bool = True) -> "Run":
        """Open the run folder ``path``. A new folder is set up from ``config``; an existing one is checked
        (format version) and must hold the same config if one is given."""
        path = Path(path).resolve()
        record, config_path = path / "run.json", path / "config.json"
        if record.is_file():
            info = _read_json(record)
            if info.get("format") != RUN_FORMAT or info.get("format_version") != RUN_FORMAT_VERSION:
                made_by = info.get("versions", {}).get("concept-influence", "an unknown version")
                raise RunError(f"{record}: run folder format {info.get('format')!r} version {info.get('format_version')!r} "
                               f"(written by concept-influence {made_by}); this version reads {RUN_FORMAT!r} version "
                               f"{RUN_FORMAT_VERSION}. Use a new run folder, or the version that wrote it")
            stored = RunConfig.from_dict(_read_json(config_path), str(config_path))
            if config is not None:
                changed = _config_diff(stored.to_dict(), {**config.to_dict(), "out": stored.out})
                if changed:
                    raise RunError(f"{path} was made with a different config ({'; '.join(changed)}); "
                                   "use a new run folder for a new config")
            return cls(path, stored)
        if config is None or not create:
            raise RunError(f"{path}: not a run folder (no run.json); start one with `concept-influence run CONFIG` "
                           "or pass --config CONFIG")
        if path.exists() and any(path.iterdir()):
            raise RunError(f"{path} exists and is not a run folder; choose an empty or new folder")
        config = RunConfig.from_dict({**config.to_dict(), "out": str(path)}, "config")
        _write_json(config_path, config.to_dict())
        _write_json(record, {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "created": _now(),
                             "versions": package_versions(), "fingerprints": {}, "stages": {}, "log": []})
        return cls(path, config)

    # ---- record --------------------------------------------------------------------------------
    @property
    def record(self) -> dict:
        return _read_json(self.path / "run.json")

    def update_record(self, change: Callable[[dict], None]) -> None:
        info = self.record
        change(info)
        _write_json(self.path / "run.json", info)

    def finish_stage(self, stage: str, ranks: Ranks, **details) -> None:
        """Note a finished stage in ``run.json`` (with the versions and command) and refresh the manifest."""
        entry = {"finished": _now(), "world_size": ranks.world_size, "command": " ".join(sys.argv),
                 "versions": package_versions(), **details}

        def change(info: dict) -> None:
            info["stages"][stage] = entry
            info["log"].append({"stage": stage, "finished": entry["finished"], "command": entry["command"]})

        self.update_record(change)
        self.write_manifest()

    def write_manifest(self) -> None:
        """List every finished file with its size and SHA-256; a file whose size and modification time are those
        of the previous manifest keeps its hash (shards and factors are not read again at every stage)."""
        path = self.path / "manifest.json"
        previous = _read_json(path)["files"] if path.is_file() else {}
        files = {}
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_file() and not p.name.startswith(".") and "partial/" not in rel and rel != "manifest.json":
                stat = p.stat()
                entry = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
                known = previous.get(rel, {})
                same = all(known.get(k) == v for k, v in entry.items())
                files[rel] = {**entry, "sha256": known["sha256"] if same else file_sha256(p)}
        _write_json(path, {"format_version": RUN_FORMAT_VERSION, "written": _now(), "files": files})

    def check_fingerprint(self, what: str, value: str) -> None:
        """Record a fingerprint on first use; refuse a later stage on a different model."""
        known = self.record["fingerprints"].get(what)
        if known is None:
            self.update_record(lambda info: info["fingerprints"].__setitem__(what, value))
        elif known != value:
            raise RunError(f"{self.path}: the {what} changed since this run started (fingerprint {known}, now {value}); "
                           "use a new run folder")

    # ---- layout --------------------------------------------------------------------------------
    @property
    def direction_path(self) -> Path:
        return self.path / "probe" / "direction.safetensors"

    @property
    def factors_dir(self) -> Path:
        return self.path / "factors"

    @property
    def scores_path(self) -> Path:
        return self.path / "scores" / "scores.safetensors"

    def shard_path(self, index: int) -> Path:
        return self.path / "scores" / "shards" / f"shard-{index:06d}.safetensors"

    def is_done(self, stage: str) -> bool:
        return stage in self.record["stages"]


def _write_or_explain(path: Path, write: Callable[[], object], kept: str) -> None:
    """Run ``write``; a failed write (disk full, …) becomes a :class:`RunError` saying what is kept."""
    try:
        write()
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise RunError(f"cannot write {path}: {reason}. {kept} Free space (or fix the cause) and run the same "
                       "command again to resume.") from e


class Pipeline:
    """The stages of one run folder in one process (one rank under ``torchrun``)."""

    def __init__(self, run: Run, ranks: Ranks, progress: bool = True):
        self.run, self.ranks, self.progress = run, ranks, progress
        self.cfg = run.config
        self._digests: dict[tuple[int, int | None], list[str]] = {}

    # ---- inputs --------------------------------------------------------------------------------
    @cached_property
    def adapter(self) -> ModelAdapter:
        adapter = load_model(self.cfg.model.path, device=self.ranks.device)
        if self.ranks.is_main:
            self.run.check_fingerprint("model", adapter.fingerprint())
        return adapter

    def _tokenize(self, path: str, limit: int | None) -> list[TokenizedExample]:
        return tokenize_examples(load_chat_jsonl(path, limit), self.adapter.tokenizer, self.cfg.data.max_length,
                                 self.cfg.data.skip_truncated)

    def _tokenize_shard(self, shard: Shard) -> list[TokenizedExample]:
        """The shard's examples, tokenised; those cut away at ``max_length`` are skipped (counted at the merge)."""
        return tokenize_kept(shard.examples, self.adapter.tokenizer, self.cfg.data.max_length,
                             self.cfg.data.skip_truncated)[0]

    def _shards(self, shard_size: int, limit: int | None = None):
        return iter_shards(self.cfg.data.train, shard_size, limit)

    def _shard_digests(self, shard_size: int, limit: int | None = None) -> list[str]:
        """The SHA-256 of each shard's lines (read once per process and shard layout)."""
        key = (shard_size, limit)
        if key not in self._digests:
            self._digests[key] = [shard.digest for shard in self._shards(shard_size, limit)]
            if not self._digests[key]:
                raise RunError(f"{self.cfg.data.train}: the file has no examples")
        return self._digests[key]

    # ---- probe ---------------------------------------------------------------------------------
    def direction(self):
        """The concept direction: trained here (``probe.positive``/``negative``) or read from ``probe.direction``."""
        from probes import ConceptDirection

        from .concepts import check_direction_compatible

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

        from .activations import collect_activations
        from .concepts import check_direction_compatible

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
        _write_or_explain(path, lambda: direction.save(path), "Nothing else was written.")
        return details

    def concept(self, with_eval: bool = True):
        """f: the projection on the probe direction, averaged over the concept's evaluation texts
        (``with_eval=False`` for the fast path, which measures each training example on itself)."""
        from .concepts import ConceptFunction

        self._require("probe", "probe train")
        eval_examples = self._tokenize(self.cfg.concept_eval, self.cfg.concept.max_examples) if with_eval else None
        return ConceptFunction.from_directions(self.direction(), eval_examples, self.cfg.concept.reduction)

    def _require(self, stage: str, command: str) -> None:
        if not self.run.is_done(stage):
            raise RunError(f"{self.run.path}: the {stage} stage has not run yet; run `concept-influence {command} "
                           f"{self.run.path}` first (or `concept-influence run {self.run.path / 'config.json'}`)")

    # ---- factors -------------------------------------------------------------------------------
    @property
    def needs_factors(self) -> bool:
        return self.cfg.scoring.estimator == "concept_influence"

    def curvature(self) -> Curvature:
        """Fit (or resume fitting) the curvature, or read ``factors.path``; checked against the model."""
        f = self.cfg.factors
        if f.path is not None:
            return Curvature.load(f.path, self.adapter)
        final = self.run.factors_dir
        if not (final / "curvature.json").is_file():
            self._require("probe", "probe train")
            hook = self.direction().hook_name
            maps = self.adapter.linear_maps(max_block=block_of_hook(hook))
            curvature = fit_curvature(self.adapter, [], maps, strategy=f.strategy, fisher=f.fisher, batch_size=f.batch_size,
                                      damping=f.damping, damping_factor=f.damping_factor, seed=f.seed, progress=False,
                                      accumulate=self._accumulate)
            if self.ranks.is_main:
                _write_or_explain(final, lambda: curvature.save(final),
                                  "The finished passes are kept in factors/statistics/.")
                for p in (final / "partial").glob("*"):
                    p.unlink()
        if self.ranks.is_main and not self.run.is_done("factors"):  # (also a curvature saved just before a kill)
            saved = json.loads((final / "curvature.json").read_text())
            self.run.finish_stage("factors", self.ranks, strategy=saved["strategy"], n_examples=saved["n_examples"],
                                  maps=[m["name"] for m in saved["maps"]], data_sha256=file_sha256(self.cfg.data.train))
        self.ranks.barrier()
        return Curvature.load(final, self.adapter)

    def _accumulate(self, name: str, collect: Callable[[Sequence[TokenizedExample]], SumStats]) -> SumStats:
        """One curvature pass over this rank's shards, checkpointed after each shard, summed over ranks."""
        f, ranks = self.cfg.factors, self.ranks
        partial = self.run.factors_dir / "partial"
        done_path = self.run.factors_dir / "statistics" / f"{name}.safetensors"
        digests = self._shard_digests(f.shard_size, f.max_examples)
        data_digest = _combine(digests)
        done = _read_checkpoint(done_path)
        if done is not None and done[1].get("data") == data_digest:
            return done[0]
        ckpt = partial / f"{name}-rank{ranks.rank}of{ranks.world_size}.safetensors"
        total, start = SumStats(), 0
        resumed = _read_checkpoint(ckpt)
        if resumed is not None:
            start = int(resumed[1].get("next_shard", 0))
            if resumed[1].get("data") == _combine(digests[:start]):
                total = resumed[0]
            else:
                warnings.warn(f"{ckpt}: the training data changed since this checkpoint; pass {name!r} starts over")
                start = 0
        mine = [i for i in range(len(digests)) if ranks.owns(i)]
        with tqdm(total=len(mine), initial=sum(i < start for i in mine), desc=f"factors: {name}", unit="shard",
                  disable=not self.progress) as bar:
            for shard in self._shards(f.shard_size, f.max_examples):
                if shard.index < start or not ranks.owns(shard.index):
                    continue
                examples = self._tokenize_shard(shard)
                if examples:
                    total.merge(collect(examples))
                meta = {"next_shard": str(shard.index + 1), "data": _combine(digests[: shard.index + 1])}
                _write_or_explain(ckpt, lambda: save_tensors(ckpt, total.state_dict(), meta),
                                  f"The checkpoint before shard {shard.index} is intact.")
                bar.update(1)
        total = ranks.all_reduce(total)
        if not total.sums:
            raise RunError(f"{self.cfg.data.train}: every example was skipped; nothing to fit the curvature on")
        if ranks.is_main:
            _write_or_explain(done_path, lambda: save_tensors(done_path, total.state_dict(), {"data": data_digest}),
                              "The per-rank checkpoints are intact.")
        ranks.barrier()
        return total

    # ---- scores --------------------------------------------------------------------------------
    def estimator(self):
        from .estimators import ConceptGradDot, ConceptInfluence, ProbeProjection

        name = self.cfg.scoring.estimator
        if name == "probe_projection":
            return ProbeProjection(self.concept(with_eval=False))
        concept = self.concept()
        if name == "concept_grad_dot":
            return ConceptGradDot(concept)
        if self.cfg.factors.path is None:
            self._require("factors", "fit-factors")
        return ConceptInfluence(concept, self.curvature())

    def _finished_shard(self, path: Path, digest: str) -> Scores | None:
        """The shard saved at ``path`` if it was computed from input lines with this ``digest``; None when it is
        missing, stale, or unreadable (with a warning: it is computed again)."""
        if not (path.is_file() and path.with_suffix(".json").is_file()):
            return None
        try:
            shard = Scores.load(path)
        except (ValueError, KeyError, UnicodeDecodeError):
            warnings.warn(f"{path}: unreadable shard; it is computed again")
            return None
        return shard if shard.metadata.get("shard_digest") == digest else None

    def scores(self) -> Scores:
        """Score every training example shard by shard (resuming), then merge the shards in data order."""
        if self.run.scores_path.is_file() and self.run.is_done("scores"):
            return Scores.load(self.run.scores_path)
        s, ranks = self.cfg.scoring, self.ranks
        estimator = self.estimator()
        n_shards = len(self._shard_digests(s.shard_size))
        mine = sum(ranks.owns(i) for i in range(n_shards))
        written = 0
        with tqdm(total=mine, desc=f"score {estimator.name}", unit="shard", disable=not self.progress) as bar:
            for shard in self._shards(s.shard_size):
                if not ranks.owns(shard.index):
                    continue
                path = self.run.shard_path(shard.index)
                if self._finished_shard(path, shard.digest) is None:
                    examples = self._tokenize_shard(shard)
                    result = (estimator.score(self.adapter, examples, batch_size=s.batch_size, progress=False)
                              if examples else Scores([], np.zeros((0, estimator.concept.k)), estimator.name,
                                                      estimator.concept.names))
                    result.metadata.update(shard_digest=shard.digest, shard=shard.index, n_lines=len(shard.examples))
                    _write_or_explain(path, lambda: result.save(path),
                                      f"The {written} shards this process finished before it are intact.")
                written += 1
                bar.update(1)
        ranks.barrier()
        if ranks.is_main:
            merged = self._merge_shards(estimator.name)
            _write_or_explain(self.run.scores_path, lambda: merged.save(self.run.scores_path), "Every shard is intact.")
            self.run.finish_stage("scores", ranks, estimator=estimator.name, n_examples=len(merged), n_shards=n_shards,
                                  n_skipped=merged.metadata["n_skipped"],
                                  data_sha256=file_sha256(self.cfg.data.train))
        ranks.barrier()
        return Scores.load(self.run.scores_path)

    def _merge_shards(self, estimator: str) -> Scores:
        ids, values, columns, metadata, n_lines = [], [], None, {}, 0
        for index, digest in enumerate(self._shard_digests(self.cfg.scoring.shard_size)):
            path = self.run.shard_path(index)
            part = self._finished_shard(path, digest)
            if part is None:
                raise RunError(f"{path}: missing or stale shard; run the same command again to compute it")
            ids += part.ids
            values.append(part.values)
            columns = part.columns
            n_lines += part.metadata["n_lines"]
            metadata = {k: v for k, v in part.metadata.items() if k not in ("shard_digest", "shard", "n_lines")}
        metadata["n_skipped"] = n_lines - len(ids)  # responses cut away at data.max_length
        return Scores(ids, np.concatenate(values), estimator, columns, metadata)

    # ---- report --------------------------------------------------------------------------------
    def report(self, top_k: int | None = None) -> Path:
        """``report/report.md``: the top and bottom ``top_k`` examples with their text, and the score distribution."""
        from .plots import plot_score_distribution
        from .data import read_chat_jsonl

        self._require("scores", "score")
        scores = Scores.load(self.run.scores_path)
        k = top_k or self.cfg.report.top_k
        wanted = {i for i, _ in scores.top(k)} | {i for i, _ in scores.bottom(k)}
        texts = {ex.id: (ex.prompt, ex.response) for ex in read_chat_jsonl(self.cfg.data.train) if ex.id in wanted}
        out = self.run.path / "report"
        plot_score_distribution(scores.column(0), out / "score_distribution.png", scores.estimator)
        info = self.run.record
        lines = [f"# Run report: {scores.estimator}", "",
                 f"Run folder `{self.run.path}`; model `{self.cfg.model.path}` (fingerprint "
                 f"{info['fingerprints'].get('model')}); data `{self.cfg.data.train}` ({len(scores)} examples scored, "
                 f"{scores.metadata.get('n_skipped', 0)} skipped because their response was cut away at "
                 f"max_length = {self.cfg.data.max_length}); "
                 f"concept: probe at `{self.cfg.probe.hook}`.", "",
                 f"## Top {k}: training on these pushes the concept up", "", *_markdown_rows(scores.top(k), texts), "",
                 f"## Bottom {k}: training on these pushes it down", "", *_markdown_rows(scores.bottom(k), texts), "",
                 "![score distribution](score_distribution.png)", ""]
        path = out / "report.md"
        atomic_write_text(path, "\n".join(lines))
        self.run.finish_stage("report", self.ranks, top_k=k)
        return path


def _markdown_rows(rows: Sequence[tuple[str, float]], texts: dict[str, tuple[str, str]]) -> list[str]:
    def cell(text: str, width: int) -> str:
        text = " ".join(text.split()).replace("|", "\\|")
        return text if len(text) <= width else text[: width - 1] + "…"

    out = ["| rank | score | id | prompt | response |", "|---:|---:|---|---|---|"]
    for rank, (i, score) in enumerate(rows, start=1):
        prompt, response = texts.get(i, ("", ""))
        out.append(f"| {rank} | {score:.4g} | `{i}` | {cell(prompt, 120)} | {cell(response, 300)} |")
    return out


def _read_checkpoint(path: Path) -> tuple[SumStats, dict[str, str]] | None:
    """A curvature checkpoint and its metadata; None (with a warning) when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        tensors, metadata = load_tensors_and_metadata(path, RunError)
        return SumStats.from_state_dict(tensors), metadata
    except (RunError, KeyError) as e:
        warnings.warn(f"{path}: unreadable checkpoint ({e}); its pass starts over")
        return None


def _combine(digests: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _open(path: str | Path | None, config: RunConfig | None, ranks: Ranks) -> Run:
    """Open (rank 0 creates) the run folder, then every rank reads it."""
    if path is None:
        raise ConfigError("no run folder: set `out` in the config or pass --out")
    run = Run.open(path, config) if ranks.is_main else None
    ranks.barrier()
    return run or Run.open(path, config, create=False)


def _device(path: str | Path | None, config: RunConfig | None) -> str:
    if config is None and path is not None and (Path(path) / "config.json").is_file():
        config = Run.open(path).config
    return config.model.device if config is not None else "auto"


def run_config(config: RunConfig, out: str | Path | None = None, progress: bool = True) -> Path:
    """Every stage of ``config`` in the run folder ``out`` (default ``config.out``); resumes a started run.
    Returns the report's path."""
    return run_stages(STAGES, out or config.out, config, progress)


def run_stages(stages: Sequence[str], path: str | Path | None, config: RunConfig | None = None, progress: bool = True,
               top_k: int | None = None) -> Path:
    """Run ``stages`` (of ``probe``, ``factors``, ``scores``, ``report``, in that order) on the run folder
    ``path``, set up from ``config`` when it is new. Returns the path of the last stage's main output."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected some of {STAGES}")
    with process_group(_device(path, config)) as ranks:
        pipeline = Pipeline(_open(path, config, ranks), ranks, progress)
        run = pipeline.run
        out = run.path
        if "probe" in stages:
            pipeline.direction()
            out = run.direction_path
        if "factors" in stages:
            if pipeline.needs_factors:
                pipeline.curvature()
                out = run.factors_dir
            elif ranks.is_main:
                print(f"scoring.estimator = {pipeline.cfg.scoring.estimator} needs no curvature; nothing to fit")
        if "scores" in stages:
            pipeline.scores()
            out = run.scores_path
        if "report" in stages and ranks.is_main:
            out = pipeline.report(top_k)
        return out
