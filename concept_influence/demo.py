"""The demo: the planted-data benchmark on the embedded corpus (no download).

The corpus is written as two paired chat JSONL files (careful and reckless answers to the same prompts) and read
back through the loader; then :func:`~concept_influence.planted.run_planted` pre-trains a small model
on careful answers, fine-tunes it on a pool with a share of reckless answers planted, trains a probe, ranks the
pool with every estimator and checks whether removing the top of each ranking removes the behaviour.
"""

from __future__ import annotations

from pathlib import Path

from .data import load_chats, write_chat_jsonl
from .planted import PlantedConfig, run_planted
from .toy.demo_corpus import make_paired_demo_corpus

__all__ = ["demo_config", "run_demo"]


def demo_config(quick: bool = False, seed: int = 0) -> PlantedConfig:
    """The demo's sizes: a few minutes on 2 cores, or about a minute with ``quick``."""
    if quick:
        return PlantedConfig.quick(paired=True, seed=seed, n_probe=80, n_pretrain=200, n_pool=240, n_eval=24,
                                   vocab_size=512, d_model=48, lds=0)
    return PlantedConfig(paired=True, seed=seed, n_probe=150, n_pretrain=600, n_pool=600, n_eval=48, n_test=48,
                         vocab_size=1024, n_layers=2, d_model=64, n_heads=4, max_length=128, pretrain_epochs=2,
                         finetune_epochs=2, pretrain_lr=2e-3, finetune_lr=2e-3, max_new_tokens=40, lds=24,
                         lds_fraction=0.25, lds_seeds=4)


def run_demo(out: str | Path, config: PlantedConfig | None = None, progress: bool = True,
             command: str | None = None, varied: bool = False) -> dict:
    """Write the embedded corpus to ``out/data`` and run the planted benchmark on it into ``out``; ``varied``: the
    corpus with ten times as many distinct prompts (``make_paired_demo_corpus``), for pools of more than ~15,000."""
    cfg = config or demo_config()
    out = Path(out)
    n_prompts = cfg.n_probe + cfg.n_pretrain + cfg.n_pool + cfg.n_eval
    clean, trait = make_paired_demo_corpus(int(n_prompts * 1.1) + 20, seed=cfg.seed,  # room for repeated prompts
                                           varied=varied)
    paths = [write_chat_jsonl(examples, out / "data" / name) for examples, name in
             ((clean, "careful.jsonl"), (trait, "reckless.jsonl"))]
    return run_planted(*(load_chats(p) for p in paths), out, cfg, progress=progress, command=command,
                       data_names=tuple(p.name for p in paths))
