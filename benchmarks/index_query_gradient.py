"""What a new question costs a gradient index at gpt2-small shape: the query gradient, formed at full size on the whole
evaluation texts and then projected (as `bench index` measured it in benchmarks/index.md), or projected from the tokens
of the prompts only (:func:`concept_influence.index.query.projected_measurement`, what `index query` does now; the query
reads the last prompt token, which in a causal model does not depend on the answer), for K = 1, 10 and 100 random
concept directions, on one and on two torch threads, in one run. The model, the evaluation texts and the concept are
those of `bench index` (a random-weight Llama of gpt2-small shape, 8 sequences of 128 tokens, directions at
``blocks.3.hook_resid_post`` read at the last prompt token); the projections are random orthonormal bases of the
default rank (the largest whose float16 row over all 84 maps fits in 64 KiB), which cost what the eigen bases cost.
Usage, from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/index_query_gradient.py > benchmarks/index_query_gradient.md
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from concept_influence.concepts import measurement_gradient
from concept_influence.estimators import ConceptInfluence
from concept_influence.index import IndexSettings
from concept_influence.index.build import resolve_rank, start_index
from concept_influence.index.query import projected_measurement, query_matrix, stream_scores
from concept_influence.index.subspace import MapSpace
from concept_influence.provenance import machine_description
from concept_influence_benchmarks.index_bench import IndexBenchConfig, synthetic_store
from concept_influence_benchmarks.speed_size_stages import SizeConfig, random_concept, random_examples, size_model


def _random_space(name: str, shape: tuple[int, int], rank: int, seed: int) -> MapSpace:
    """Random orthonormal bases with a diagonal curvature (an eigen space's shapes and costs)."""
    gen = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(d, min(rank, d), generator=gen)).Q for d in shape]
    return MapSpace(name, shape, bases[0], bases[1], 1.0, inverse=torch.ones(bases[0].shape[1], bases[1].shape[1]))


def _new_questions(adapter, sc, evals, maps, spaces, settings, n_rows: int) -> list[tuple]:
    """A new question from start to scores over ``n_rows`` stored rows (synthetic, the default layout, read warm),
    for K = 1 and 100 on two threads: (K, gradient, preconditioning, streamed product, total) seconds."""
    out = []
    with tempfile.TemporaryDirectory(prefix="index-query-") as tmp:
        template = start_index(Path(tmp) / "template", settings, maps, {})
        template.manifest["checkpoints"].append({"source": "synthetic", "weight": 1.0, "finished": True})
        template.save_manifest()
        store = synthetic_store(Path(tmp) / "template", n_rows, Path(tmp) / "rows")
        for k in (1, 100):
            concept = random_concept(adapter, sc, k, evals)
            stream_scores(store, 0, torch.zeros(store.dim, k))  # into the page cache
            t = [time.perf_counter()]
            grads = projected_measurement(ConceptInfluence(concept), adapter, maps, spaces)[0]
            t.append(time.perf_counter())
            q = query_matrix(store, 0, spaces, grads, "ekfac", 0.1)
            t.append(time.perf_counter())
            ids, _ = stream_scores(store, 0, q)
            t.append(time.perf_counter())
            assert len(ids) == n_rows
            out.append((k, t[1] - t[0], t[2] - t[1], t[3] - t[2], t[3] - t[0]))
    return out


def main() -> None:
    cfg = IndexBenchConfig()
    sc = SizeConfig(size=cfg.size, seq_len=cfg.seq_len, concept_layer=cfg.concept_layer, n_eval=cfg.n_eval)
    adapter = size_model(sc)
    evals = random_examples(cfg.n_eval, sc, "eval", 1)
    maps = adapter.linear_maps(cfg.concept_layer)
    settings = IndexSettings(budget=cfg.budget)
    rank = resolve_rank(settings, maps)  # the index holds the maps the concept needs, as in `bench index`
    spaces = [_random_space(m.name, m.shape, rank, i) for i, m in enumerate(maps)]

    def full_then_projected(concept):  # as `bench index` measured it: whole texts, [K, d_out, d_in] gradients
        grads = measurement_gradient(adapter, evals, maps, lambda b: concept.per_example(adapter, b), concept.k,
                                     "the concept", batch_size=8)
        return {s.name: s.reduce(grads[s.name]) for s in spaces}

    def from_tokens(concept):
        return projected_measurement(ConceptInfluence(concept), adapter, maps, spaces)[0]

    rows, agreement = [], None
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for k in (1, 10, 100):
            concept = random_concept(adapter, sc, k, evals)
            for label, run in (("full, then projected", full_then_projected), ("prompts only, projected from the tokens",
                                                                                from_tokens)):
                if label.startswith("full") and k > 10:
                    continue  # [100, d_out, d_in] gradients of 28 maps: 15 GB of float32
                start = time.perf_counter()
                got = run(concept)
                rows.append((threads, k, label, time.perf_counter() - start))
                if threads == 1 and k == 10:
                    agreement = got if agreement is None else max(
                        float((got[n] - agreement[n]).abs().max() / agreement[n].abs().max()) for n in got)
    seconds = {(t, k, label): s for t, k, label, s in rows}
    print("# The query gradient of a gradient index at gpt2-small shape\n")
    print("Reproduce: `OMP_NUM_THREADS=1 python benchmarks/index_query_gradient.py > benchmarks/index_query_gradient.md`\n")
    m = machine_description()
    print(f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load average at the start "
          f"{m['load_average_start'][0]:.2f}. A random-weight Llama of gpt2-small shape; {cfg.n_eval} evaluation "
          f"sequences of {cfg.seq_len} tokens; K random directions at `blocks.{cfg.concept_layer}.hook_resid_post` read "
          f"at the last prompt token; the {len(maps)} weight matrices of blocks 0..{cfg.concept_layer}, each projected "
          f"to rank {rank} per side. Every time is from this one run.\n")
    print("| torch threads | K | query gradient | seconds | per concept (s) | × faster than full, then projected |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for t, k, label, s in rows:
        base = seconds.get((t, k, "full, then projected"))
        ratio = f"{base / s:.1f}" if base is not None and not label.startswith("full") else ""
        print(f"| {t} | {k} | {label} | {s:.1f} | {s / k:.2f} | {ratio} |")
    print(f"\nThe two ways agree to {agreement:.1e} (largest difference over the largest entry, per map, K = 10).")
    n_rows = 100_000
    print(f"\n## A new question over {n_rows} stored rows, two threads\n")
    print(f"From the concept to its scores: the query gradient as above, its preconditioning in the spaces, and the "
          f"product with {n_rows} synthetic float16 rows of the default layout ({2 * sum(s.dim for s in spaces)} bytes "
          "each), streamed over the shards from the page cache.\n")
    print("| K | query gradient (s) | preconditioning (s) | streamed product (s) | in all (s) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for k, *parts in _new_questions(adapter, sc, evals, maps, spaces, settings, n_rows):
        print(f"| {k} | " + " | ".join(f"{p:.1f}" for p in parts) + " |")


if __name__ == "__main__":
    main()
