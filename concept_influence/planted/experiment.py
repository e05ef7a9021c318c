"""The planted-data benchmark (DESIGN §3): does a ranking find the training data that causes a behaviour?

Protocol, for any two chat JSONL files (clean answers and planted-style answers):

1. split by prompt into a probe set, a pre-training set, a training pool and an evaluation set (no prompt in two
   splits); a share ``rate`` of the pool gets the planted answer (the ground truth);
2. train a byte-level BPE tokenizer, pre-train a small TransformerLens model on clean text, fine-tune it on the pool
   (or, with ``model``, LoRA fine-tunes of the user's pre-trained Hugging Face model with its tokenizer);
3. train a logistic probe for planted vs clean answers on the fine-tuned model's activations; the concept is the
   probe projection of the model's own answers to the evaluation prompts;
4. score the pool with every estimator; retrieval metrics against the planted labels;
5. behaviour (paired data: mean per-token log p(planted answer) − log p(clean answer) on the evaluation prompts;
   unpaired: mean probe projection of the model's own sampled answers) of clean and planted fine-tunes over seeds,
   and after removing the top of each ranking and fine-tuning again;
6. optional concept-LDS: fine-tune on random halves of the pool, Spearman of predicted vs measured concept.

:func:`run_planted` runs these steps. The settings are in :mod:`.experiment_config`, step 1 in :mod:`.splits`,
fine-tuning in :mod:`.finetuning`, the probe and the concept of step 3 in :mod:`.concept_stage`, the behaviour
measurements of steps 5 and 6 in :mod:`.behaviour`, the outputs in :mod:`.experiment_report`; the optional stages are
:mod:`.query_study`, :mod:`.curvature_study` and :mod:`.sae_stage`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..curvature import fit_curvature
from ..data import ChatExample
from ..estimators import (
    ConceptGradDot,
    ConceptInfluence,
    GradDot,
    InfluenceFunction,
    LengthBaseline,
    ProbeProjection,
    ProjectionDifference,
    RandomBaseline,
    TfidfBaseline,
)
from ..estimators.baselines import response_texts
from ..evaluation import retrieval_metrics
from ..fileio import atomic_write_text
from ..generation import sample_responses
from ..provenance import machine_description
from ..toy.small_model import build_small_model, seed_everything, train_bpe_tokenizer, train_model
from .behaviour import behaviour_section, concept_lds, mean_answer_loss
from .concept_stage import (
    broad_factor_estimators,
    checkpoint_estimators,
    compared_queries,
    concept_check_section,
    planted_concept,
)
from .curvature_study import run_curvature_study
from .experiment_config import BenchmarkError, PlantedConfig
from .experiment_report import format_retrieval, report_plots, write_results
from .finetuning import Finetuner, lora_model
from .query_study import run_query_study
from .splits import split_planted, tokenize_splits

__all__ = ["run_planted"]


def run_planted(clean: Sequence[ChatExample], planted: Sequence[ChatExample], out: str | Path,
                config: PlantedConfig | None = None, *, progress: bool = True, command: str | None = None,
                data_names: tuple[str, str] = ("clean file", "planted file")) -> dict:
    """Run the benchmark into ``out`` (``results.json``, ``results.md``, plots, scores, probe, tokenizer);
    returns the results."""
    cfg = config or PlantedConfig()
    out = Path(out)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    if cfg.model:  # the user's pre-trained model with fresh LoRA adapters: no tokenizer or model to train
        adapter = lora_model(cfg)
        cfg = replace(cfg, n_pretrain=0, pretrain_epochs=0, n_layers=adapter.n_blocks, d_model=adapter.d_model,
                      vocab_size=len(adapter.tokenizer))
    splits = split_planted(clean, planted, cfg, *data_names)
    print(f"splits: probe {len(splits.probe_positive)}+{len(splits.probe_negative)}, pre-train {len(splits.pretrain)}, "
        f"pool {len(splits.pool)} ({sum(splits.planted)} planted), eval {len(splits.eval_clean)}")

    if cfg.model:
        tokenizer = adapter.tokenizer
    else:
        texts = [f"{c.prompt}\n{c.response}" for c in splits.pretrain + splits.probe_positive + splits.probe_negative]
        tokenizer = train_bpe_tokenizer(texts, out / "tokenizer", cfg.vocab_size)
    pool_tk, labels, tk = tokenize_splits(splits, tokenizer, cfg)

    if not cfg.model:
        adapter = build_small_model(tokenizer, cfg.n_layers, cfg.d_model, cfg.n_heads, n_ctx=cfg.max_length, seed=cfg.seed)
        t0 = time.perf_counter()
        pre_losses = train_model(adapter, tk["pretrain"], cfg.pretrain_epochs, cfg.pretrain_lr, cfg.batch_size,
                                 tokens="all", seed=cfg.seed, progress=progress, desc="pre-train")
        pretrain_seconds = time.perf_counter() - t0
        print(f"pre-trained {cfg.n_layers} blocks d{cfg.d_model} on {len(tk['pretrain'])} clean chats: loss "
            f"{pre_losses[-1]:.3f} ({pretrain_seconds:.0f} s)")

    tuner = Finetuner(adapter, cfg, progress)
    t0 = time.perf_counter()
    tuner.finetune(pool_tk, cfg.seed, "fine-tune (planted pool)")
    finetune_seconds = time.perf_counter() - t0
    print(f"fine-tuned on the pool ({finetune_seconds:.0f} s)")

    probe, own, concept = planted_concept(adapter, tk, cfg)
    hook = probe.direction.hook_name
    probe.direction.save(out / "probe.safetensors")
    print(f"probe at {hook}: held-out accuracy {probe.metrics['accuracy']:.3f}, AUROC {probe.metrics['roc_auc']:.3f}")
    check = concept_check_section(adapter, probe.direction, tk, splits.eval_planted is not None, cfg, out)

    def behaviour() -> float:
        """Paired: mean per-token log p(planted) − log p(clean) answer; unpaired: concept on the model's own answers."""
        if splits.eval_planted is not None:
            return float(np.mean(mean_answer_loss(adapter, tk["eval"], cfg.batch_size)
                                 - mean_answer_loss(adapter, tk["eval_planted"], cfg.batch_size)))
        answers = sample_responses(adapter, tk["eval"], cfg.max_new_tokens, seed=cfg.seed, progress=False,
                                   min_new_tokens=1)
        return float(concept.evaluate(adapter, answers)[0])

    t0 = time.perf_counter()
    curvature = fit_curvature(adapter, pool_tk, maps=adapter.linear_maps(), strategy="ekfac",
                              batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    fit_seconds = time.perf_counter() - t0
    estimators = [
        ConceptInfluence(concept, curvature), *compared_queries(probe.direction, own, curvature, cfg),
        *broad_factor_estimators(concept, tuner.pretrained, tk["pretrain"], pool_tk, cfg),
        ConceptGradDot(concept), *checkpoint_estimators(concept, tuner.pretrained, pool_tk, cfg),
        InfluenceFunction(tk["test"], curvature),
        GradDot(tk["test"]), ProbeProjection(concept),
        ProjectionDifference(concept, cfg.max_new_tokens, seed=cfg.seed, min_new_tokens=1),
        TfidfBaseline(response_texts(adapter, tk["pos"])), LengthBaseline(), RandomBaseline(cfg.seed),
    ]
    estimators = _chosen(estimators, cfg.estimators)
    results: dict = {
        "command": command, "machine": machine_description(), "config": asdict(cfg), "data": list(data_names),
        "splits": {"probe": len(tk["pos"]), "pretrain": len(tk["pretrain"]), "pool": len(pool_tk),
                   "planted": int(sum(labels)), "eval": len(tk["eval"]), "dropped_duplicates": splits.dropped_duplicates,
                   "dropped_too_long_from_pool": len(splits.pool) - len(pool_tk)},
        "probe": {"hook_name": hook, **probe.metrics}, "query": cfg.query, "concept_check": check,
        "concept_value": float(concept.evaluate(adapter)[0]),
        "ekfac_fit_seconds": fit_seconds, "finetune_seconds": finetune_seconds,
        "pretrain_seconds": None if cfg.model else pretrain_seconds, "estimators": {},
    }
    scores: dict[str, np.ndarray] = {}
    for est in estimators:
        t0 = time.perf_counter()
        s = est.score(adapter, pool_tk, batch_size=cfg.batch_size, progress=progress)
        seconds = time.perf_counter() - t0
        s.save(out / "scores" / f"{est.name}.safetensors")
        scores[est.name] = s.column(0)
        results["estimators"][est.name] = {**retrieval_metrics(scores[est.name], labels),
                                           "seconds_per_1k": 1000 * seconds / len(pool_tk)}
    if cfg.sae_latents:
        from .sae_stage import SAE_ESTIMATORS, sae_section

        results["sae"] = sae_section(adapter, hook, (tk["pos"], tk["neg"]), pool_tk, labels, own, probe.direction,
                                     curvature, scores, results["estimators"], cfg, out, progress)
    print("\n" + format_retrieval(results))
    if cfg.query_study:
        results["query_study"] = run_query_study(adapter, curvature, pool_tk, labels, tk["pos"], tk["neg"], own,
                                                 seed=cfg.seed, batch_size=cfg.batch_size, progress=progress)
        atomic_write_text(out / "query_study.json", json.dumps(results["query_study"], indent=1))
    if cfg.curvature_study:
        fit_sets = {"pool": pool_tk, "pretrain+pool": tk["pretrain"][: len(pool_tk)] + pool_tk}
        results["curvature_study"], _ = run_curvature_study(
            adapter, probe.direction, own, pool_tk, labels, fit_sets, tuner.pretrained,
            queries=tuple(dict.fromkeys((cfg.query, "prompt_mean"))), batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    write_results(out, results)

    if cfg.retrain:
        results["behaviour"] = behaviour_section(tuner, behaviour, pool_tk, labels, scores, cfg, concept)
        write_results(out, results)
    if cfg.lds:  # the SAE estimators predict another concept than the one measured here
        probe_scores = {k: v for k, v in scores.items() if not (cfg.sae_latents and k in SAE_ESTIMATORS)}
        results["lds"] = concept_lds(tuner, concept, pool_tk, probe_scores, cfg)
    results["plots"] = report_plots(out, scores, labels, results)
    results["total_seconds"] = time.perf_counter() - started
    write_results(out, results)
    print(f"\nresults: {out / 'results.md'} ({results['total_seconds']:.0f} s in all)")
    return results


def _chosen(estimators: list, names: Sequence[str]) -> list:
    """The estimators named in ``names`` (all when empty); a name that is none of them is a :class:`BenchmarkError`."""
    if not names:
        return estimators
    built = [est.name for est in estimators]
    unknown = [n for n in names if n not in built]
    if unknown:
        raise BenchmarkError(f"estimators {', '.join(unknown)} are not among this run's: {', '.join(built)}")
    return [est for est in estimators if est.name in names]
