"""The demo's planted benchmark as a testbed of the family study (:mod:`.emergent_family`): the same variants and
stability checks on the demo corpus, one run per seed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from concept_influence.data import load_chats, write_chat_jsonl
from concept_influence.estimators.baselines import response_texts
from concept_influence.models import checkpointed_weights
from concept_influence.planted.behaviour import mean_answer_loss
from concept_influence.planted.concept_stage import planted_concept
from concept_influence.planted.experiment_config import PlantedConfig
from concept_influence.planted.splits import split_planted, tokenize_splits
from concept_influence.toy.demo_corpus import make_paired_demo_corpus
from concept_influence.toy.small_model import build_small_model, train_bpe_tokenizer, train_model

from .emergent_family import Testbed, _finetune, retrain_missing, run_variant

__all__ = ["demo_testbed", "run_demo_seed", "retrain_missing_demo"]


def demo_testbed(cfg: PlantedConfig, out: Path, progress: bool, on_step) -> Testbed:
    """The demo's corpus, pre-training and fine-tune (``on_step`` sees its steps); the planted-answer probe read at
    the last prompt token of the model's own answers; the behaviour is the paired log-prob gap."""
    n_prompts = cfg.n_probe + cfg.n_pretrain + cfg.n_pool + cfg.n_eval
    clean, trait = make_paired_demo_corpus(int(n_prompts * 1.1) + 20, seed=cfg.seed)
    paths = [write_chat_jsonl(examples, out / "data" / name) for examples, name in
             ((clean, "careful.jsonl"), (trait, "reckless.jsonl"))]
    splits = split_planted(*(load_chats(p) for p in paths), cfg, *(p.name for p in paths))
    texts = [f"{c.prompt}\n{c.response}" for c in splits.pretrain + splits.probe_positive + splits.probe_negative]
    tokenizer = train_bpe_tokenizer(texts, out / "tokenizer", cfg.vocab_size)
    pool, labels, tk = tokenize_splits(splits, tokenizer, cfg)
    adapter = build_small_model(tokenizer, cfg.n_layers, cfg.d_model, cfg.n_heads, n_ctx=cfg.max_length, seed=cfg.seed)
    train_model(adapter, tk["pretrain"], cfg.pretrain_epochs, cfg.pretrain_lr, cfg.batch_size, tokens="all", seed=cfg.seed,
                progress=progress, desc="pre-train")
    pretrained = checkpointed_weights(adapter)
    _finetune(adapter, pretrained, pool, cfg, cfg.seed, progress, on_step)
    probe, _, concept = planted_concept(adapter, tk, cfg)

    def behaviour() -> float:
        return float(np.mean(mean_answer_loss(adapter, tk["eval"], cfg.batch_size)
                             - mean_answer_loss(adapter, tk["eval_planted"], cfg.batch_size)))

    return Testbed(adapter, pretrained, pool, np.asarray(labels), concept,
                   {"pool": pool, "pretrain+pool": tk["pretrain"][: len(pool)] + pool}, tk["test"],
                   response_texts(adapter, tk["pos"]), behaviour, {"probe_auroc": probe.metrics.get("roc_auc")})


def run_demo_seed(out: str | Path, seed: int, *, quick: bool = False, n_seeds: int = 3, progress: bool = False) -> dict:
    """The family study on the demo at ``seed`` (the demo's sizes: :func:`concept_influence.demo.demo_config`)."""
    from concept_influence.demo import demo_config

    cfg = replace(demo_config(quick=quick, seed=seed), n_seeds=n_seeds)
    return run_variant(cfg, out, testbed=demo_testbed, progress=progress)


def retrain_missing_demo(folder: str | Path, progress: bool = False) -> dict:
    """:func:`~.emergent_family.retrain_missing` for a demo seed's run."""
    return retrain_missing(folder, progress, testbed=demo_testbed, config_class=PlantedConfig)

