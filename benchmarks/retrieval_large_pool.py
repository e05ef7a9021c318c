"""A real pool of N examples (default 20,000) whose exact scores are all known, for certified retrieval (issue 28).

``--design demo`` (the default):
The demo's planted-data benchmark (``concept_influence.demo``: the embedded paired corpus, the demo's model and
training) with a pool of N at planted rate ``--rate``, on the corpus with the more varied prompts (the plain one has
too few distinct prompts past ~15,000), scoring only what ``benchmarks/retrieval_coverage.py --real`` reads:
``concept_influence`` (exact EK-FAC, the pipeline's default settings) and ``probe_projection`` (the forward-only first
stage), into ``FOLDER/scores/*.safetensors``. No behaviour measurement, filter-and-retrain, LDS, concept check or
compared query. ``--design emergent``: the emergent testbed's default design (health fine-tune, money behaviour, the
persona direction; ``bench emergent``'s model and training) with a pool of N (varied prompts, at most about 83,000:
each domain has about 84,000 distinct prompts; ``--richer-prompts`` adds a sentence, twelve times as many) at
``--rate``, exact Concept Influence with EK-FAC fitted on the pool at the default damping, the probe projection, and
two row encoders (:data:`ENCODERS`) fitted on the gradient index of a 5 % sample, whose scores of the pool are first
stages too; each stage's seconds go to ``FOLDER/seconds.json``
(retrieval_coverage.py states each first stage's own cost from it); with ``--behaviour`` the exact pass also scores
the behaviour's own ranking (``scores/behaviour.safetensors``: the union's second ranking, for
``retrieval_learned.py --union``). ``--design audit``: notebook 07's audit (the
unpaired demo corpus with varied prompts, about 336,000 distinct, so pools past 100,000; its model trained on the
pool; EK-FAC on a 10 % sample) with exact Concept Influence and the probe projection, ``seconds.json`` and
``pool.json``. Every design writes ``pool.json``, the settings that rebuild the chats (for ``retrieval_learned.py``).
The stage times go to stdout. Usage, from the
repository root:

    OMP_NUM_THREADS=1 python benchmarks/retrieval_large_pool.py runs/retrieval-pool-20k
    OMP_NUM_THREADS=1 python benchmarks/retrieval_large_pool.py runs/retrieval-emergent-20k --design emergent
    OMP_NUM_THREADS=1 python benchmarks/retrieval_coverage.py --real runs/retrieval-pool-20k --sizes \\
        > benchmarks/retrieval-large-pool.md

(``--sizes`` with no size: the real pool alone, ``--real-reps`` repetitions, 2,000 by default; without it the
synthetic tables run too, about 10 minutes).

Measured on one thread of a 2-core machine busy with another benchmark (load ~2.5): N = 1,000 in 23 s, 2,000 in
37-46 s, 4,000 in 64 s (peak RSS 0.76 GB at 2,000; the same scores to the bit when run again). Per 1,000 pool
examples: fine-tune 4.4 s, EK-FAC fit 6.2 s, exact scoring 2.3 s, fast path 0.7 s; pre-training (600 chats) and the
rest about 8 s in all. N = 20,000 extrapolates to about 5 minutes (fine-tune 1.5, fit 2.1, exact scoring 0.8, fast
path 0.25 min) and a folder of ~20 MB; measured at 20,000: 6.5 minutes on one thread of an idle machine (40 on one
that the block-width benchmark's two threads were using). ``--design emergent`` at 80,000: 42 minutes, 6.9 GB.
Not resumable (the planted pipeline is not): a run starts again from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time  # noqa: E402

import numpy as np  # noqa: E402

from concept_influence.curvature import CurvatureSettings, fit_curvature  # noqa: E402
from concept_influence.demo import run_demo  # noqa: E402
from concept_influence.encoder import RowEncoder  # noqa: E402
from concept_influence.estimators import ConceptInfluence, ProbeProjection, SourceInfluence  # noqa: E402
from concept_influence.index import GradientIndex  # noqa: E402
from concept_influence.scores import Scores  # noqa: E402
from concept_influence.toy.small_model import seed_everything  # noqa: E402
from concept_influence_benchmarks.emergent_family import StepRecorder, draw_design, emergent_testbed  # noqa: E402
from concept_influence_benchmarks.retrieval_pools import (  # noqa: E402
    AUDIT,
    ENCODER_INDEX,
    FIRST_STAGES,
    audit_corpus,
    demo_pool_config,
    emergent_pool_config,
    write_pool_settings,
)

#: the exact scores and the first stage retrieval_coverage.py pairs (its ``_real_pairs``)
ESTIMATORS = ("concept_influence", "probe_projection")
#: the emergent pool's encoder first stages (score file name: the last block whose map inputs it reads; None: all)
ENCODERS = {"encoder": None, "encoder[block 0]": 0}


def build_pool(out: str | Path, n_pool: int = 20_000, rate: float = 0.05, seed: int = 0, *, quick: bool = False,
               progress: bool = True, command: str | None = None, **sizes) -> dict:
    """Run the demo benchmark into ``out`` with a pool of ``n_pool`` scored by :data:`ESTIMATORS` only; ``quick``:
    the quick demo's model, ``sizes``: further :class:`~concept_influence.planted.PlantedConfig` settings (tests).
    Returns the run's results."""
    cfg = replace(demo_pool_config(n_pool, rate, seed, quick, **sizes), estimators=ESTIMATORS)
    results = run_demo(out, cfg, progress=progress, command=command, varied=True)
    write_pool_settings(out, "demo", n_pool, rate, seed, quick, **sizes)
    return results


def build_emergent_pool(out: str | Path, n_pool: int = 20_000, rate: float = 0.05, seed: int = 0, *,
                        quick: bool = False, progress: bool = True, encoder_share: float = 0.05, encoder_m: int = 64,
                        behaviour: bool = False, recommended: bool = False, fit_share: float = 0.2,
                        **sizes) -> dict[str, float]:
    """Train the emergent testbed's default design with a pool of ``n_pool`` (varied prompts) into ``out`` and write
    the pool's :data:`ESTIMATORS` scores, and two encoder first stages (:data:`ENCODERS`: codes of ``encoder_m``
    dimensions fitted on the index of a uniform ``encoder_share`` of the pool), to ``out/scores``; ``behaviour``:
    the exact pass also scores the behaviour's own ranking (classic gradient-dot on the testbed's target-domain bad
    answers, as a run's ``[scoring] behaviour``) into ``out/scores/behaviour.safetensors``, the second ranking of the
    union a run answers with. ``recommended``: instead, the estimator the benchmarks recommend (the family's
    ``source[adam]x1|pool|all``): Concept Influence with unrolled (SOURCE) preconditioning summed over the base, the
    middle and the end of the fine-tune, with Adam's step scales, EK-FAC fitted at each on a uniform ``fit_share`` of
    the pool, and the behaviour's ranking summed over the same checkpoints (``behaviour`` implied; no encoders).
    ``quick``: :meth:`EmergentConfig.quick`'s sizes, ``sizes``: further settings (tests). Returns the seconds of each
    stage, also written to ``out/seconds.json``."""
    out = Path(out)
    cfg = emergent_pool_config(n_pool, rate, seed, quick, **sizes)
    seed_everything(cfg.seed)
    seconds, t0 = {}, time.perf_counter()
    recorder = StepRecorder() if recommended else None
    bed = emergent_testbed(cfg, out, progress, recorder)
    seconds["pre-train and fine-tune"] = time.perf_counter() - t0
    if recommended:
        _score_source_pool(out, bed, recorder, cfg, fit_share, progress, seconds)
        write_pool_settings(out, "emergent", n_pool, rate, seed, quick, **sizes)
        return _write_seconds(out, seconds)
    exact = ConceptInfluence(bed.concept, fit=CurvatureSettings(batch_size=cfg.batch_size, seed=cfg.seed),
                             **(dict(variants=True, behaviour=bed.test) if behaviour else {}))
    t0 = time.perf_counter()
    curvature = exact.fitted_curvature(bed.adapter, exact.tracked_maps(bed.adapter), bed.pool, cfg.batch_size, progress)
    seconds["EK-FAC fit"] = time.perf_counter() - t0
    _score_pool(out, bed.adapter, bed.pool, exact, ProbeProjection(bed.concept), cfg.batch_size, progress, seconds)
    if behaviour:
        exact.variants_.select(["behaviour"]).save(out / "scores" / "behaviour.safetensors")
    rng = np.random.default_rng(cfg.seed)
    sample = [bed.pool[i] for i in np.sort(rng.choice(len(bed.pool), round(encoder_share * len(bed.pool)),
                                                      replace=False))]
    with tempfile.TemporaryDirectory(prefix="encoder-index-") as scratch:
        t0 = time.perf_counter()
        index = GradientIndex.build(Path(scratch) / "index", bed.adapter, sample, curvature, progress=progress)
        seconds[ENCODER_INDEX] = time.perf_counter() - t0
        for name, last_block in ENCODERS.items():
            t0 = time.perf_counter()
            encoder = RowEncoder.fit(index, bed.adapter, sample, m=encoder_m, sample=len(sample), last_block=last_block,
                                     seed=cfg.seed, batch_size=cfg.batch_size, progress=progress)
            codes = encoder.encode(bed.adapter, bed.pool, batch_size=cfg.batch_size, progress=progress)
            scores = encoder.score(exact, bed.adapter, codes, batch_size=cfg.batch_size, progress=progress)
            scores.save(out / "scores" / f"{name}.safetensors")
            seconds[FIRST_STAGES[name][-1]] = time.perf_counter() - t0
    write_pool_settings(out, "emergent", n_pool, rate, seed, quick, **sizes)
    return _write_seconds(out, seconds)


def build_audit_pool(out: str | Path, n_pool: int = 20_000, rate: float = 0.05, seed: int = 0, *,
                     progress: bool = True, **sizes) -> dict[str, float]:
    """Notebook 07's audit at ``n_pool`` chats (the demo corpus with varied prompts, about 336,000 distinct: pools
    past the paired corpus's ~110,000): train its model on the pool, fit EK-FAC on a 10 % sample, and write exact
    Concept Influence and the probe projection of every chat to ``out/scores``, each stage's seconds to
    ``out/seconds.json`` and the settings to ``out/pool.json`` (what rebuilds the texts). ``sizes``: overrides of
    :data:`AUDIT` (tests)."""
    import torch

    from concept_influence.activations import collect_activations
    from concept_influence.concepts import ConceptFunction
    from concept_influence.curvature import fit_curvature
    from concept_influence.data import tokenize_examples
    from concept_influence.generation import sample_responses
    from concept_influence.toy import build_small_model, train_bpe_tokenizer, train_model
    from probes import train_diff_means_probe

    cfg = AUDIT | sizes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    seed_everything(seed)
    seconds, t0 = {}, time.perf_counter()
    corpus = audit_corpus(n_pool, rate, seed, cfg["n_probe"], cfg["n_eval"])
    texts = [f"{c.prompt}\n{c.response}" for c in corpus.train[:4000] + corpus.probe_positive + corpus.probe_negative]
    tokenizer = train_bpe_tokenizer(texts, out / "tokenizer", cfg["vocab_size"])
    train, pos, neg, evals = (tokenize_examples(x, tokenizer, cfg["max_length"]) for x in
                              (corpus.train, corpus.probe_positive, corpus.probe_negative, corpus.eval_prompts))
    adapter = build_small_model(tokenizer, cfg["n_layers"], cfg["d_model"], cfg["n_heads"], n_ctx=cfg["max_length"],
                                seed=seed)
    train_model(adapter, train, cfg["epochs"], cfg["lr"], cfg["batch_size"], tokens="all", seed=seed, progress=progress)
    hook = f"blocks.{cfg['n_layers'] - 1}.hook_resid_post"
    direction = train_diff_means_probe(*(collect_activations(adapter, x, hook, progress=False) for x in (pos, neg)),
                                       hook, seed=seed).direction
    own = sample_responses(adapter, evals, cfg["max_new_tokens"], seed=seed, progress=False)
    concept = ConceptFunction.from_directions([direction], eval_examples=own)
    seconds["train"] = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    fit_set = [train[i] for i in np.sort(rng.choice(len(train), round(cfg["fit_share"] * len(train)), replace=False))]
    curvature = fit_curvature(adapter, fit_set, adapter.linear_maps(), batch_size=cfg["batch_size"], seed=seed,
                              progress=progress)
    seconds["EK-FAC fit"] = time.perf_counter() - t0
    _score_pool(out, adapter, train, ConceptInfluence(concept, curvature), ProbeProjection(concept),
                cfg["batch_size"], progress, seconds)
    write_pool_settings(out, "audit", n_pool, rate, seed, planted=[int(p) for p in corpus.planted], **sizes)
    return _write_seconds(out, seconds)


def _score_source_pool(out: Path, bed, recorder, cfg, fit_share: float, progress: bool, seconds: dict) -> None:
    """The ``recommended`` pool of :func:`build_emergent_pool`: SOURCE and the behaviour's ranking over the fine-tune's
    checkpoints; the factor fits' seconds (fixed costs, on a sample) are kept apart from exact scoring's."""
    import concept_influence.estimators.unrolled as unrolled_module

    rng = np.random.default_rng(cfg.seed)
    fit_set = [bed.pool[i] for i in np.sort(rng.choice(len(bed.pool), round(fit_share * len(bed.pool)), replace=False))]
    points = recorder.points(bed.pretrained)
    exact = SourceInfluence(bed.concept, [w for w, _, _ in points], [h for _, h, _ in points], fit_examples=fit_set,
                            fit=CurvatureSettings(batch_size=cfg.batch_size, seed=cfg.seed),
                            step_scales=[s for _, _, s in points], train_batch_size=cfg.batch_size, behaviour=bed.test)
    fits, passes = [], []

    def timed(function, into):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            got = function(*args, **kwargs)
            into.append(time.perf_counter() - t0)
            return got
        return run

    # to time the fits, and each checkpoint's scoring pass, inside the estimator
    with mock.patch.object(unrolled_module, "fit_curvature", timed(fit_curvature, fits)), \
            mock.patch.object(unrolled_module, "score_with_queries", timed(unrolled_module.score_with_queries, passes)):
        _score_pool(out, bed.adapter, bed.pool, exact, ProbeProjection(bed.concept), cfg.batch_size, progress, seconds)
    seconds["EK-FAC fits (one per checkpoint)"] = sum(fits)
    seconds["exact scoring"] -= sum(fits)
    ids = [e.id for e in bed.pool]
    Scores(ids, exact.behaviour_, estimator="behaviour", columns=["behaviour"]).save(
        out / "scores" / "behaviour.safetensors")
    # each checkpoint's part of the sum (base, middle, end), and its scoring pass's seconds in the training order
    Scores(ids, np.stack(list(exact.parts_.values()), axis=1), estimator="source parts", columns=list(exact.parts_),
           metadata={"pass_seconds": passes[::-1]}).save(out / "scores" / "source_parts.safetensors")


def _score_pool(out: Path, adapter, pool, exact, fast, batch_size: int, progress: bool, seconds: dict) -> None:
    """Score the pool with exact Concept Influence and the probe projection into ``out/scores``, timing each."""
    for name, estimator, stage in (("concept_influence", exact, "exact scoring"),
                                   ("probe_projection", fast, FIRST_STAGES["probe_projection"][-1])):
        t0 = time.perf_counter()
        estimator.score(adapter, pool, batch_size=batch_size, progress=progress).save(
            out / "scores" / f"{name}.safetensors")
        seconds[stage] = time.perf_counter() - t0


def _write_seconds(out: Path, seconds: dict[str, float]) -> dict[str, float]:
    """Add the total and write ``out/seconds.json`` (retrieval_coverage.py reads each first stage's cost from it)."""
    seconds["total"] = sum(seconds.values())
    (out / "seconds.json").write_text(json.dumps(seconds, indent=1) + "\n")
    return seconds


def stage_seconds(results: dict) -> dict[str, float]:
    """Wall seconds per stage of a run: pre-train, fine-tune, EK-FAC fit, exact scoring, fast path, the rest."""
    n = results["splits"]["pool"]
    est = results["estimators"]
    stages = {"pre-train": results["pretrain_seconds"], "fine-tune": results["finetune_seconds"],
              "EK-FAC fit": results["ekfac_fit_seconds"],
              "exact scoring": est["concept_influence"]["seconds_per_1k"] * n / 1000,
              "fast path": est["probe_projection"]["seconds_per_1k"] * n / 1000}
    return {**stages, "rest": results["total_seconds"] - sum(stages.values()), "total": results["total_seconds"]}


def family_design(spec: str) -> dict:
    """``SEED:INDEX`` → that family design's :class:`EmergentConfig` overrides, less its pool size and planted rate."""
    try:
        family_seed, index = (int(part) for part in spec.split(":"))
    except ValueError:
        raise SystemExit(f"--family-design: expected SEED:INDEX (two integers), got {spec!r}") from None
    return {key: value for key, value in draw_design(index, family_seed).items() if key not in ("n_pool", "rate")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the run folder to write")
    p.add_argument("--n-pool", type=int, default=20_000)
    p.add_argument("--rate", type=float, default=0.05, help="the planted share of the pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--design", choices=("demo", "emergent", "audit"), default="demo")
    p.add_argument("--behaviour", action="store_true", help="emergent: also the behaviour's own ranking (the union's "
                                                            "second ranking; retrieval_learned.py --union)")
    p.add_argument("--source", action="store_true", help="emergent: the recommended estimator instead (SOURCE and the "
                                                         "behaviour's ranking over the fine-tune's checkpoints)")
    p.add_argument("--family-design", metavar="SEED:INDEX", help="emergent: the INDEX-th design drawn by the "
                   "emergent family of seed SEED (its domains, marker, schedule, vocabulary, pre-training size and "
                   "seed) instead of the default design; --n-pool and --rate stay this script's")
    p.add_argument("--richer-prompts", action="store_true", help="emergent: prompts with a sentence about the "
                   "household too (varied_prompts=2: about twelve times the ~84,000 distinct prompts per domain), for "
                   "pools past ~80,000")
    args = p.parse_args(argv)
    design = family_design(args.family_design) if args.family_design else {}
    if (design or args.richer_prompts) and args.design != "emergent":
        p.error("--family-design and --richer-prompts need --design emergent")
    if args.richer_prompts:
        design["varied_prompts"] = 2
    command = "OMP_NUM_THREADS=1 python benchmarks/retrieval_large_pool.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.design == "emergent":
        stages, n = build_emergent_pool(args.out, args.n_pool, args.rate, design.pop("seed", args.seed),
                                        behaviour=args.behaviour, recommended=args.source, **design), args.n_pool
    elif args.design == "audit":
        stages, n = build_audit_pool(args.out, args.n_pool, args.rate, args.seed), args.n_pool
    else:
        results = build_pool(args.out, args.n_pool, args.rate, args.seed, command=command)
        stages, n = stage_seconds(results), results["splits"]["pool"]
    print("\n| stage | seconds | per 1,000 pool examples |\n|---|---:|---:|")
    for stage, seconds in stages.items():
        print(f"| {stage} | {seconds:.1f} | {1000 * seconds / n:.2f} |")
    folder = shlex.quote(str(args.out))
    follow = (f"retrieval_learned.py {folder} --default (or --union, --rankings)" if args.source
              else f"retrieval_coverage.py --real {folder} --sizes")
    print(f"\npool {n}; next: OMP_NUM_THREADS=1 python benchmarks/{follow}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
