"""The gradient index benchmark (``concept-influence bench index``): size, build time, query time and accuracy of the
index against exact scoring, and against Bergson's index, in one run.

* **At a real shape** (GPT-2 small, random weights, as in the speed benchmark; the concepts' blocks 0..3 tracked):
  the EK-FAC fit, one exact scoring pass (K concepts in one pass), our index at the default size (float16, the largest
  rank that fits the byte budget) with each projection, at float32 and the rank of Bergson's, and Bergson's index
  (its autocorrelation Hessian pass and its gradient pass): bytes per example, build time over the exact pass,
  Spearman against exact Concept Influence and classic influence.
* **Query time**: the query's own costs on that model (its gradient on the evaluation texts for K = 1 and K = ``many``
  concepts; projecting and preconditioning it) and the streamed product over N synthetic rows of the default layout,
  page cache dropped (cold) and then warm; Bergson's load and search over as many synthetic rows.
* **The demo** (:mod:`.index_bench_demo`): every projection at equal bytes against the exact estimators, median over
  seeds, and ours against Bergson's on a Llama of the demo's size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from concept_influence.curvature import fit_curvature
from concept_influence.estimators import ConceptInfluence, InfluenceFunction
from concept_influence.index import GradientIndex, IndexSettings
from concept_influence.index.build import resolve_rank
from concept_influence.index.query import projected_measurement, query_matrix, stream_scores
from concept_influence.index.store import IndexStore
from concept_influence.provenance import machine_description

from .index_bench_config import IndexBenchConfig
from .seeds import SeedReport
from .speed_size_stages import SizeConfig, random_concept, random_examples, size_model

__all__ = ["IndexBenchConfig", "run_index_benchmark"]


class _BlocksInfluence(InfluenceFunction):
    """Classic influence over the maps of blocks ``0..max_block`` (those the benchmark's index holds)."""

    def __init__(self, test, curvature, max_block: int):
        super().__init__(test, curvature)
        self.max_block = max_block

    def tracked_maps(self, adapter):
        return adapter.linear_maps(self.max_block)


def _timed(run):
    start = time.perf_counter()
    value = run()
    return value, time.perf_counter() - start


def spearman_columns(got: np.ndarray, exact: np.ndarray) -> list[float]:
    """The Spearman correlation of each column of ``got`` with the same column of ``exact``."""
    return [float(spearmanr(got[:, k], exact[:, k]).statistic) for k in range(exact.shape[1])]


@dataclass
class ExactAtShape:
    """The real-shape setting: the random-weight model, its training and evaluation sequences, the EK-FAC over the
    maps of blocks ``0..concept_layer``, the two queries and their exact scores (``[n_examples, K]``), and ``facts``:
    the sizes of the model and its maps and the seconds of the fit and the exact passes."""

    adapter: object
    sizes: SizeConfig
    train: list
    evals: list
    curvature: object
    queries: dict
    exact: dict
    facts: dict


def exact_at_shape(cfg: IndexBenchConfig, influence_function: bool = True) -> ExactAtShape:
    """Build the real-shape setting of ``cfg``, fit the EK-FAC and score both queries exactly (only Concept Influence
    when not ``influence_function``)."""
    sc = SizeConfig(size=cfg.size, n_examples=cfg.n_examples, seq_len=cfg.seq_len, concept_layer=cfg.concept_layer,
                    n_eval=cfg.n_eval)
    adapter = size_model(sc)
    train, evals = random_examples(cfg.n_examples, sc, "train", 0), random_examples(cfg.n_eval, sc, "eval", 1)
    test = random_examples(cfg.n_test, sc, "test", 2)
    maps = adapter.linear_maps(cfg.concept_layer)
    every = adapter.linear_maps()
    default_all = resolve_rank(IndexSettings(budget=cfg.budget), every)
    out = {"parameters": sum(p.numel() for p in adapter.model.parameters()), "tracked_maps": len(maps),
           "tracked_parameters": sum(m.shape[0] * m.shape[1] for m in maps), "all_maps": len(every),
           "all_parameters": sum(m.shape[0] * m.shape[1] for m in every), "all_maps_rank": default_all,
           "all_maps_bytes": 2 * sum(min(default_all, m.shape[0]) * min(default_all, m.shape[1]) for m in every)}
    print(f"[index bench] {cfg.size}: EK-FAC fit on {cfg.n_examples} examples ...", flush=True)
    curvature, out["fit_seconds"] = _timed(lambda: fit_curvature(adapter, train, maps, batch_size=8, progress=False))
    concept = random_concept(adapter, sc, cfg.n_concepts, evals)
    queries = {"concept_influence": ConceptInfluence(concept, curvature)}
    if influence_function:
        queries["influence_function"] = _BlocksInfluence(test, curvature, cfg.concept_layer)
    exact = {}
    for name, est in queries.items():
        est.score(adapter, train[:1], progress=False)  # the preconditioned queries, computed once and kept
        scores, seconds = _timed(lambda est=est: est.score(adapter, train, progress=False))
        exact[name], out[f"exact_{name}_seconds"] = scores.values, seconds
    out["exact_pass_seconds"] = out["exact_concept_influence_seconds"]
    return ExactAtShape(adapter, sc, train, evals, curvature, queries, exact, out)


def size_study(cfg: IndexBenchConfig, work: Path) -> dict:
    """The real-shape part: fit, exact pass, our builds and Bergson's, accuracy, and the query's own costs."""
    setting = exact_at_shape(cfg)
    out = dict(setting.facts)
    adapter, train, curvature, queries, exact = (setting.adapter, setting.train, setting.curvature, setting.queries,
                                                 setting.exact)
    variants = {"eigen": IndexSettings(budget=cfg.budget), "random": IndexSettings(projection="random", budget=cfg.budget),
                "eigen float32": IndexSettings(budget=cfg.budget, dtype="float32")}
    out["variants"] = {}
    for label, settings in variants.items():
        print(f"[index bench] {cfg.size}: build {label} ...", flush=True)
        index, seconds = _timed(lambda s=settings, label=label: GradientIndex.build(
            work / label.replace(" ", "-"), adapter, train, curvature, s, progress=False))
        row = {"rank": index.store.manifest["rank"], "dtype": settings.dtype, "bytes": index.bytes_per_example,
               "build_seconds": seconds}
        for name, est in queries.items():
            row[f"spearman_{name}"] = spearman_columns(index.score(est, adapter, progress=False).values, exact[name])
        out["variants"][label] = row
    if cfg.bergson:
        out["bergson"] = _bergson(adapter, train, queries, exact, cfg, out["variants"]["eigen float32"]["rank"], work)
    out["query_costs"] = _query_costs(adapter, setting.sizes, cfg, setting.evals, work / "eigen")
    return out


def _bergson(adapter, train, queries, exact, cfg: IndexBenchConfig, rank: int, work: Path) -> dict:
    from .bergson_index import build_bergson_index

    print(f"[index bench] {cfg.size}: Bergson's index, projection {rank} ...", flush=True)
    index = build_bergson_index(adapter, train, cfg.concept_layer, rank, work / "bergson")
    row = {"rank": rank, "dtype": "float32", "bytes": index.bytes_per_example(), "hessian_seconds": index.hessian_seconds,
           "build_seconds": index.build_seconds}
    maps = adapter.linear_maps(cfg.concept_layer)
    for name, est in queries.items():
        grads, _ = est.measurement(adapter, maps, 8, False)
        scores, row[f"query_seconds_{name}"] = index.scores(grads)
        row[f"spearman_{name}"] = spearman_columns(scores, exact[name])
    row["index"], row["shapes"] = index, {m.name: m.shape for m in maps}
    return row


def _query_costs(adapter, sc: SizeConfig, cfg: IndexBenchConfig, evals, index_path: Path) -> dict:
    """The query's own seconds on the model: its gradient on the evaluation texts (K = 1 and ``many``) and its
    projection and preconditioning in the default index's spaces."""
    store = IndexStore.open(index_path)
    maps, spaces = adapter.linear_maps(cfg.concept_layer), store.load_spaces(0)
    out = {}
    for k in (1, cfg.many):
        concept = random_concept(adapter, sc, k, evals)
        grads, out[f"gradient_seconds_k{k}"] = _timed(lambda c=concept: projected_measurement(
            ConceptInfluence(c), adapter, maps, spaces)[0])
        _, out[f"precondition_seconds_k{k}"] = _timed(lambda g=grads: query_matrix(store, 0, spaces, g, "ekfac", 0.1))
    return out


def _drop_cache(paths) -> None:
    """Evict files from the page cache (written back first): the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def synthetic_store(template: Path, n_rows: int, path: Path, shard_size: int = 1024) -> IndexStore:
    """An index of the template's layout holding ``n_rows`` random rows (for timing the streamed product)."""
    source = IndexStore.open(template)
    manifest = json.loads(json.dumps(source.manifest))
    n_shards = math.ceil(n_rows / shard_size)
    manifest["checkpoints"] = [{**manifest["checkpoints"][0], "n_shards": n_shards, "digests": ["synthetic"] * n_shards}]
    store = IndexStore(path, manifest)
    store.save_manifest()
    gen = torch.Generator().manual_seed(0)
    for index in range(n_shards):
        n = min(shard_size, n_rows - index * shard_size)
        store.write_shard(0, index, torch.randn(n, store.dim, generator=gen), [f"row:{index * shard_size + j}" for j in
                                                                                 range(n)], "synthetic", n)
    return store


def stream_timing(template: Path, rows: tuple[int, ...], many: int, work: Path) -> list[dict]:
    """Seconds of the streamed product over N synthetic rows for K = 1 and ``many``: cold (page cache dropped) then
    warm."""
    out = []
    for n in rows:
        print(f"[index bench] streamed product over {n} rows ...", flush=True)
        store = synthetic_store(template, n, work / f"rows-{n}")
        files = sorted((store.checkpoint_dir(0) / "shards").glob("*.safetensors"))
        for k in (1, many):
            q = torch.randn(store.dim, k)
            _drop_cache(files)
            _, cold = _timed(lambda q=q: stream_scores(store, 0, q))
            _, warm = _timed(lambda q=q: stream_scores(store, 0, q))
            out.append({"rows": n, "k": k, "cold_seconds": cold, "warm_seconds": warm,
                        "gigabytes": sum(f.stat().st_size for f in files) / 1e9})
        shutil.rmtree(store.path)
    return out


def bergson_stream_timing(index, rows: tuple[int, ...], many: int, grads_shape: dict, work: Path) -> list[dict]:
    """Bergson's load and search over N synthetic rows (its ``gradients.bin`` refilled with random rows)."""
    out = []
    for n in rows:
        path = work / f"bergson-rows-{n}"
        shutil.copytree(index.path, path)
        info = json.loads((path / "info.json").read_text())
        info["num_grads"] = info["num_items"] = n
        (path / "info.json").write_text(json.dumps(info))
        width = sum(info["grad_sizes"].values())
        with open(path / "gradients.bin", "wb") as fh:
            for start in range(0, n, 1024):
                fh.write(np.random.default_rng(start).standard_normal((min(1024, n - start), width), np.float32).tobytes())
        copy = type(index)(path, index.hessian_path, index.projection_dim, index.to_ours, 0.0, 0.0)
        for k in (1, many):
            grads = {name: torch.randn(k, *shape) for name, shape in grads_shape.items()}
            _drop_cache([path / "gradients.bin"])
            out.append({"rows": n, "k": k, "cold_seconds": copy.scores(grads)[1], "warm_seconds": copy.scores(grads)[1]})
        shutil.rmtree(path)
    return out


def run_index_benchmark(out_dir: str | Path, cfg: IndexBenchConfig | None = None) -> dict:
    """Run every part; write ``index.json`` and ``index.md`` to ``out_dir`` (again after every demo seed). An earlier
    report in ``out_dir`` made with the same settings keeps its real-shape part and its demo seeds: only the seeds it
    lacks are run."""
    from .bergson_bridge import bergson_unavailable
    from .index_bench_demo import demo_study
    from .index_bench_report import format_index_markdown

    cfg = cfg or IndexBenchConfig()
    out_dir = Path(out_dir)
    missing = bergson_unavailable() if cfg.bergson else "not asked for"
    cfg.bergson = missing is None
    report = SeedReport(out_dir, "index", {"config": asdict(cfg)}, "demo", cfg.seeds, format_index_markdown)
    data = report.data
    with tempfile.TemporaryDirectory(prefix="concept-influence-index-") as tmp:
        work = Path(tmp)
        if "size" not in data:
            data.update(machine=machine_description(), bergson=missing)
            size = size_study(cfg, work)
            data["streamed"] = stream_timing(work / "eigen", cfg.rows, cfg.many, work)
            bergson = size.pop("bergson", None)
            if bergson is not None:
                index, shapes = bergson.pop("index"), bergson.pop("shapes")
                bergson["streamed"] = bergson_stream_timing(index, cfg.rows, cfg.many, shapes, work)
                size["bergson"] = bergson
            data["size"] = size
            report.write()
        for seed in report.missing:
            print(f"[index bench] demo, seed {seed} ...", flush=True)
            data["demo"].append(demo_study(seed, cfg.ranks, cfg.budget, cfg.quick, cfg.bergson, work / f"demo{seed}"))
            report.write()
    report.write()  # also when every part asked for was there already
    return data
