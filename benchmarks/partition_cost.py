"""No cost at small sizes (issue 27): at GPT-2-small shape, the speed benchmark's fit and K = 1 scoring as today (every
map's factors in memory, ``fit_curvature``) against one partition with its factors written per map to disk and
streamed when the query is preconditioned (``fit_partitioned(..., partitions=1, directory=...)``, what a run folder
with ``[factors] partitions = 1`` does), in alternating order over several rounds of one run; the median of each and
their ratio (goal: within 5 %), and the largest relative difference of the scores. Usage, from the repository root:

    OMP_NUM_THREADS=2 python benchmarks/partition_cost.py --rounds 2 > benchmarks/partition-cost.md

The model, data, concept and settings are the size benchmark's (``concept_influence_benchmarks.speed_size_stages``,
``concept-influence bench speed --size gpt2-small``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from concept_influence.curvature import CurvatureSettings, fit_curvature, fit_partitioned  # noqa: E402
from concept_influence.engine import ScoringSettings  # noqa: E402
from concept_influence.estimators import ConceptInfluence  # noqa: E402
from concept_influence.provenance import machine_description  # noqa: E402
from concept_influence_benchmarks import speed_size_stages as sizes  # noqa: E402
from concept_influence_benchmarks.kronfluence_bridge import DAMPING_FACTOR  # noqa: E402


def _pipeline(adapter, cfg: sizes.SizeConfig, train, concept, stored: bool):
    """Fit, then score ``train`` with one concept: (fit seconds, scoring seconds incl. the query, scores)."""
    settings = CurvatureSettings(strategy="ekfac", fisher="true", batch_size=cfg.batch_size, damping=None,
                                 damping_factor=DAMPING_FACTOR, seed=cfg.seed)
    with tempfile.TemporaryDirectory(prefix="partition-cost-") as folder:
        start = time.perf_counter()
        if stored:
            curvature = fit_partitioned(adapter, train, cfg.concept_layer, 1, settings, directory=folder,
                                        progress=False)
        else:
            curvature = fit_curvature(adapter, train, maps=cfg.concept_layer, settings=settings, progress=False)
        fitted = time.perf_counter()
        estimator = ConceptInfluence(concept, curvature, scoring=ScoringSettings(batch_size=cfg.batch_size))
        scores = estimator.score(adapter, train, progress=False).column(0)
        return fitted - start, time.perf_counter() - fitted, np.asarray(scores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", default="gpt2-small")
    p.add_argument("--examples", type=int, default=32)
    args = p.parse_args()
    cfg = sizes.SizeConfig(size=args.size, n_examples=args.examples, kronfluence=False,
                     concept_layer=min(3, sizes.SIZES[args.size]["num_hidden_layers"] - 1))
    torch.set_num_threads(cfg.threads)
    adapter = sizes.size_model(cfg)
    train = sizes.random_examples(cfg.n_examples, cfg, "train", cfg.seed)
    concept = sizes.random_concept(adapter, cfg, 1, sizes.random_examples(cfg.n_eval, cfg, "eval", cfg.seed + 1))
    times = {False: [], True: []}
    scores = {}
    for r in range(args.rounds):
        for stored in ((False, True) if r % 2 == 0 else (True, False)):
            fit_s, score_s, scores[stored] = _pipeline(adapter, cfg, train, concept, stored)
            times[stored].append((fit_s, score_s))
    diff = float(np.abs(scores[True] - scores[False]).max() / np.abs(scores[False]).max())
    m = machine_description()
    print(f"# One partition, factors per map on disk, against today's in-memory fit at {args.size} shape\n")
    print(f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/partition_cost.py --rounds "
          f"{args.rounds}`; {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} on {m['torch_threads']} "
          f"thread(s).\n")
    print(f"The size benchmark's model ({args.size}), {cfg.n_examples} random sequences of {cfg.seq_len} tokens, "
          f"batch {cfg.batch_size}, EK-FAC (true Fisher) on the maps up to block {cfg.concept_layer}, one concept; "
          f"each pipeline {args.rounds} times in alternating order, medians. Scoring includes forming and "
          "preconditioning the query (with one partition: streamed from the map files). Goal: within 5 %.\n")
    print("| pipeline | fit (s) | scoring (s) | fit + scoring (s) | × today |")
    print("|---|---:|---:|---:|---:|")
    med = {k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in times.items()}
    for stored, label in ((False, "today: every map's factors in memory"),
                          (True, "one partition, factors per map on disk, streamed")):
        fit_s, score_s = med[stored]
        ratio = (fit_s + score_s) / sum(med[False])
        print(f"| {label} | {fit_s:.1f} | {score_s:.1f} | {fit_s + score_s:.1f} | **{ratio:.3f}** |")
    print(f"\nLargest score difference, relative to the largest score: {diff:.1e}. Per round (fit, scoring seconds): "
          f"today {[(round(a, 1), round(b, 1)) for a, b in times[False]]}, one partition "
          f"{[(round(a, 1), round(b, 1)) for a, b in times[True]]}.")


if __name__ == "__main__":
    main()
