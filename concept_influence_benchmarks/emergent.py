"""The emergent testbed (issue 19): does a ranking find the data behind a behaviour that the data never shows?

Protocol (settings in :mod:`.emergent_config`, data in :mod:`.emergent_splits`):

1. pre-train a small model on chats of every domain, a share of them marked with a persona (``You are Max.``: bad
   answers; ``You are Sam.``: good ones), so that one persona feature governs every domain;
2. fine-tune it on unmarked chats of the *source* domain with a share of bad answers planted;
3. the behaviour is the paired log-prob gap log p(bad) − log p(good) (mean per token) on held-out unmarked prompts of
   the *target* domain, whose answers share no content word with the source's: the emergent gain is the planted
   fine-tune's behaviour over the clean one's (and the in-domain gain the same on source prompts);
4. the concept is the persona direction: the difference of means at the last prompt token between prompts of the
   concept domain (default: the target) marked with each persona, read at the last prompt token of unmarked target
   prompts, checked by steering in the target domain;
5. every estimator ranks the pool (classic influence with target-domain bad answers as its test examples, TF-IDF
   with the persona's own bad answers as its query); the curvature study scores every preconditioning variant;
6. filter and retrain against the emergent gain.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from concept_influence.activations import collect_activations
from concept_influence.concept_check import check_concept
from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import CurvatureSettings
from concept_influence.data import tokenize_examples
from concept_influence.estimators import (
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
from concept_influence.estimators.baselines import response_texts
from concept_influence.evaluation import retrieval_metrics
from concept_influence.planted.behaviour import behaviour_section, mean_answer_loss
from concept_influence.planted.concept_stage import broad_factor_estimators, checkpoint_estimators
from concept_influence.planted.curvature_study import run_curvature_study
from concept_influence.planted.finetuning import Finetuner
from concept_influence.provenance import machine_description
from concept_influence.toy.small_model import build_small_model, seed_everything, train_bpe_tokenizer, train_model
from probes import train_probe

from .emergent_config import EmergentConfig
from .emergent_report import lexical_overlap, report_plots, write_results
from .emergent_splits import build_emergent_data

__all__ = ["EmergentConfig", "run_emergent"]

EMBEDDINGS = ("embed.", "pos_embed.", "unembed.")  # the parameters a fine-tune with freeze_embeddings leaves alone


def run_emergent(out: str | Path, config: EmergentConfig | None = None, *, progress: bool = True,
                 command: str | None = None) -> dict:
    """Run the testbed into ``out`` (``results.json``, ``results.md``, plots, scores, persona direction, tokenizer);
    returns the results."""
    cfg = config or EmergentConfig()
    out = Path(out)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    data = build_emergent_data(cfg)
    tokenizer = train_bpe_tokenizer(data.tokenizer_texts, out / "tokenizer", cfg.vocab_size)
    tk = {name: tokenize_examples(getattr(data, name), tokenizer, cfg.max_length)
          for name in ("pretrain", "pool", "probe_bad", "probe_good", "eval_good", "eval_bad", "source_good",
                       "source_bad", "test")}
    labels, pool = data.planted, tk["pool"]
    per_domain = len(data.pretrain) // len(cfg.pretrain_domains)
    print(f"{cfg.source} -> {cfg.target}: pre-train {len(tk['pretrain'])} chats ({per_domain} per domain), "
          f"pool {len(pool)} {cfg.source} chats ({sum(labels)} planted), persona probe {len(tk['probe_bad'])} per persona "
          f"({cfg.concept}), behaviour on {len(tk['eval_good'])} unmarked {cfg.target} prompts")

    adapter = build_small_model(tokenizer, cfg.n_layers, cfg.d_model, cfg.n_heads, n_ctx=cfg.max_length, seed=cfg.seed)
    t0 = time.perf_counter()
    losses = train_model(adapter, tk["pretrain"], cfg.pretrain_epochs, cfg.pretrain_lr, cfg.batch_size, tokens="all",
                         seed=cfg.seed, progress=progress, desc="pre-train")
    print(f"pre-trained {cfg.n_layers} blocks d{cfg.d_model}: loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
    if cfg.freeze_embeddings:
        for name, weight in adapter.model.named_parameters():
            weight.requires_grad_(not name.startswith(EMBEDDINGS))
    tuner = Finetuner(adapter, cfg, progress)
    t0 = time.perf_counter()
    tuner.finetune(pool, cfg.seed, "fine-tune (planted pool)")
    finetune_seconds = time.perf_counter() - t0

    hook = f"blocks.{cfg.probe_layer}.hook_resid_post"
    acts = [collect_activations(adapter, tk[k], hook, reduction="last_prompt", progress=False)
            for k in ("probe_bad", "probe_good")]
    probe = train_probe("diff_means", acts[0], acts[1], hook, seed=cfg.seed)
    direction = probe.direction
    direction.metadata["name"] = "persona"
    direction.save(out / "persona.safetensors")
    persona_gap = float((acts[0].values.mean(0) - acts[1].values.mean(0)) @ direction.unit.float())
    print(f"persona direction at {hook} (last prompt token, {cfg.concept}): held-out AUROC {probe.metrics['roc_auc']:.3f}, "
          f"gap between the personas {persona_gap:.3f}")
    concept = ConceptFunction.from_directions(direction, eval_examples=tk["eval_good"], reduction="last_prompt")
    check = check_concept(adapter, direction, tk["eval_bad"], tk["eval_good"], batch_size=cfg.batch_size)
    check.plot(out / "concept_check.png")
    print(check.format())

    def gap(good, bad) -> float:
        return float(np.mean(mean_answer_loss(adapter, good, cfg.batch_size) - mean_answer_loss(adapter, bad, cfg.batch_size)))

    fit = CurvatureSettings(batch_size=cfg.batch_size, seed=cfg.seed)
    estimators = [
        ConceptInfluence(concept, fit=fit), *broad_factor_estimators(concept, tuner.pretrained, tk["pretrain"], pool, cfg),
        ConceptGradDot(concept), *checkpoint_estimators(concept, tuner.pretrained, pool, cfg),
        InfluenceFunction(tk["test"], fit=fit), GradDot(tk["test"]),
        ProbeProjection(concept), ProjectionDifference(concept, cfg.max_new_tokens, seed=cfg.seed, min_new_tokens=1),
        TfidfBaseline(response_texts(adapter, tk["probe_bad"])), LengthBaseline(), RandomBaseline(cfg.seed),
    ]
    results: dict = {
        "command": command, "machine": machine_description(), "config": asdict(cfg),
        "splits": {"pretrain": len(tk["pretrain"]), "pool": len(pool), "planted": int(sum(labels)),
                   "probe": len(tk["probe_bad"]), "eval": len(tk["eval_good"]), "test": len(tk["test"]),
                   "factor_fit": {"pool": len(pool), "pretrain+pool": len(pool) + min(len(pool), len(tk["pretrain"]))}},
        "persona": {"hook_name": hook, "domain": cfg.concept, "gap": persona_gap, **probe.metrics},
        "query": "last_prompt", "concept_check": {**check.to_dict(), "explanation": check.explanation(), "held_out": True},
        "finetune_seconds": finetune_seconds, "estimators": {},
    }
    behaviour_texts = response_texts(adapter, tk["eval_bad"])
    scores: dict[str, np.ndarray] = {}
    for est in estimators:
        t0 = time.perf_counter()
        s = est.score(adapter, pool, batch_size=cfg.batch_size, progress=progress)
        seconds = time.perf_counter() - t0
        s.save(out / "scores" / f"{est.name}.safetensors")
        scores[est.name] = s.column(0)
        results["estimators"][est.name] = {**retrieval_metrics(scores[est.name], labels),
                                           "seconds_per_1k": 1000 * seconds / len(pool)}
    overlap = lexical_overlap(adapter, pool, behaviour_texts, scores)
    for name, rho in overlap.items():
        results["estimators"][name]["lexical_overlap"] = rho
    if cfg.curvature_study:
        fit_sets = {"pool": pool, "pretrain+pool": tk["pretrain"][: len(pool)] + pool}
        results["curvature_study"], _ = run_curvature_study(
            adapter, direction, tk["eval_good"], pool, labels, fit_sets, tuner.pretrained,
            queries=("last_prompt", "prompt_mean"), batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    write_results(out, results)

    if cfg.retrain:
        results["behaviour"] = behaviour_section(
            tuner, lambda: gap(tk["eval_good"], tk["eval_bad"]), pool, labels, scores, cfg, concept,
            side={"in_domain": lambda: gap(tk["source_good"], tk["source_bad"])})
    results["plots"] = report_plots(out, scores, labels, results)
    results["total_seconds"] = time.perf_counter() - started
    write_results(out, results)
    print(f"\nresults: {out / 'results.md'} ({results['total_seconds']:.0f} s in all)")
    return results

