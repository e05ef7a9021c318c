"""How large a gradient index must be to rank like the exact estimators at gpt2-small shape with random weights:
the Spearman correlation of the eigen index (and of the random one, while its dense curvature fits in memory) with
exact Concept Influence and classic influence as the rank per side grows, in the setting of `bench index`'s real-shape
part (a random-weight Llama of gpt2-small shape, 48 random sequences of 128 tokens, 4 random concept directions at
``blocks.3.hook_resid_post``, the 28 weight matrices of blocks 0..3), and how flat the EK-FAC factors' spectra are
(the share of each factor's trace in its top eigenvalues). One run; accuracy does not depend on the threads.
Usage, from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/index_rank_curve.py > benchmarks/index_rank_curve.md
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from concept_influence.index import GradientIndex, IndexSettings
from concept_influence.provenance import machine_description
from concept_influence_benchmarks.index_bench import IndexBenchConfig, exact_at_shape, spearman_columns

EIGEN_RANKS = (34, 96, 192, 384, 768)
RANDOM_RANKS = (34, 48)  # the random index's curvature is a dense [r², r²] matrix per map: 48² is the most that fits
SHARE_RANKS = (34, 96, 384)


def _trace_shares(curvature, ranks) -> dict[str, list[float]]:
    """Per factor side (``out``: S, ``in``: A), the median over maps of the share of the trace held by the top ``r``
    eigenvalues, for each ``r`` in ``ranks``; beside it the share a flat spectrum would give (r / d)."""
    shares: dict[str, list[list[float]]] = {"out": [], "in": []}
    for eigen in curvature.factors.values():
        for side, values in (("out", eigen.lambda_s), ("in", eigen.lambda_a)):
            v = torch.sort(values.double().clamp_min(0), descending=True).values
            shares[side].append([float(v[:r].sum() / v.sum()) for r in ranks])
    return {side: list(np.median(np.array(rows), axis=0)) for side, rows in shares.items()}


def main(cfg: IndexBenchConfig | None = None, eigen_ranks=EIGEN_RANKS, random_ranks=RANDOM_RANKS) -> None:
    cfg = cfg or IndexBenchConfig()
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not the report's
        setting = exact_at_shape(cfg)
    facts = setting.facts
    full = 4 * facts["tracked_parameters"]
    m = machine_description()
    print("# How large an index must be at gpt2-small shape with random weights\n")
    print("Reproduce: `OMP_NUM_THREADS=1 python benchmarks/index_rank_curve.py > benchmarks/index_rank_curve.md`.\n")
    print(f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}. The setting of `bench index`'s real-shape part "
          f"(benchmarks/index.md): a random-weight Llama of {cfg.size} shape, {cfg.n_examples} random sequences of "
          f"{cfg.seq_len} tokens, {cfg.n_concepts} random concept directions at "
          f"`blocks.{cfg.concept_layer}.hook_resid_post` read on {cfg.n_eval} evaluation sequences, classic influence "
          f"on {cfg.n_test} test sequences, the {facts['tracked_maps']} weight matrices of blocks "
          f"0..{cfg.concept_layer} ({full / 1e6:.0f} MB of float32 gradient per example). Float16 rows; Spearman "
          "correlation with the exact estimator's scores (median over the concepts, lowest in brackets).\n")
    print("| projection | rank per side | bytes / example | × smaller | Spearman, Concept Influence | "
          "Spearman, classic influence |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
    with tempfile.TemporaryDirectory(prefix="index-rank-curve-") as tmp:
        for projection, ranks in (("eigen", eigen_ranks), ("random", random_ranks)):
            for rank in ranks:  # each row printed when measured: a run stopped early keeps the rows before
                print(f"[rank curve] {projection} rank {rank} ...", flush=True, file=sys.stderr)
                path = Path(tmp) / f"{projection}-{rank}"
                index = GradientIndex.build(path, setting.adapter, setting.train, setting.curvature,
                                            IndexSettings(projection=projection, rank=rank), progress=False)
                ci, inf = (spearman_columns(index.score(est, setting.adapter, progress=False).values,
                                            setting.exact[name]) for name, est in setting.queries.items())
                print(f"| {projection} | {rank} | {index.bytes_per_example} | {full / index.bytes_per_example:.0f} | "
                      f"{np.median(ci):.3f} ({min(ci):.3f}) | {np.median(inf):.3f} |", flush=True)
                del index
                shutil.rmtree(path)
    shares = _trace_shares(setting.curvature, SHARE_RANKS)
    print("\nHow flat the curvature is: the share of each EK-FAC factor's trace held by its top r eigenvalues (median "
          "over the maps), and the share r / d_model of a perfectly flat spectrum of the residual width.\n")
    print("| factor | " + " | ".join(f"top {r}" for r in SHARE_RANKS) + " |")
    print("| --- | " + " | ".join("---:" for _ in SHARE_RANKS) + " |")
    dims = {"out": "S (output gradients)", "in": "A (inputs)"}
    for side, label in dims.items():
        print(f"| {label} | " + " | ".join(f"{s:.3f}" for s in shares[side]) + " |")
    d_model = setting.adapter.d_model
    print(f"| flat, d = {d_model} | " + " | ".join(f"{r / d_model:.3f}" for r in SHARE_RANKS) + " |")
    print(f"\nIn all {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
