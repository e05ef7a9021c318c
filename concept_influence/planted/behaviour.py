"""The planted benchmark's behaviour measurements: the planting effect, filter-and-retrain and concept-LDS."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr, ttest_ind

from ..concepts import ConceptFunction
from ..data import TokenizedExample, iter_batches
from ..filtering import removal_indices
from ..models import ModelAdapter
from .experiment_config import PlantedConfig
from .finetuning import Finetuner

__all__ = ["planting_effect", "mean_answer_loss", "behaviour_section", "concept_lds"]


def planting_effect(clean: Sequence[float], planted: Sequence[float]) -> dict:
    """Gain of the planted over the clean fine-tune, in units of the seeds' pooled spread, and whether planting
    raised the behaviour (gain > 0 and one-sided Welch p < 0.05; with one seed: gain > 0 only)."""
    gain = float(np.mean(planted) - np.mean(clean))
    sd = float(np.sqrt((np.var(clean, ddof=1) + np.var(planted, ddof=1)) / 2)) if len(clean) > 1 else float("nan")
    p = float("nan")
    if len(clean) > 1 and sd > 0:
        p = float(ttest_ind(planted, clean, equal_var=False, alternative="greater").pvalue)
    raised = gain > 0 and (p < 0.05 if len(clean) > 1 else True)
    return {"gain": gain, "seed_sd": sd, "effect_size": gain / sd if sd and sd > 0 else float("nan"),
            "p_value": p, "raised": bool(raised)}


@torch.no_grad()
def mean_answer_loss(adapter: ModelAdapter, examples: Sequence[TokenizedExample], batch_size: int) -> np.ndarray:
    """Each example's mean per-token loss on its response (float64), in the examples' order."""
    return np.concatenate([adapter.per_example_loss(b).double().cpu().numpy()
                           for b in iter_batches(examples, batch_size, adapter.pad_token_id)])


def behaviour_section(tuner: Finetuner, behaviour: Callable[[], float], pool: list[TokenizedExample],
                       labels: list[int], scores: dict[str, np.ndarray], cfg: PlantedConfig,
                       concept: ConceptFunction, side: Mapping[str, Callable[[], float]] | None = None) -> dict:
    """Behaviour of clean and planted fine-tunes over seeds, then after removing the top of each ranking (the rule
    of :func:`~concept_influence.filtering.removal_indices`), and how far planting moves the concept f itself
    (``concept_shift``, in seed standard deviations): a concept that planting does not move cannot find the data.
    ``side`` names further measurements taken on the same clean and planted fine-tunes (``section["side"]``)."""
    clean_pool = [t for t, lab in zip(pool, labels) if not lab]
    side = dict(side or {})

    def measured() -> tuple[float, ...]:
        return behaviour(), float(concept.evaluate(tuner.adapter)[0]), *(m() for m in side.values())

    planted_b, planted_f, *planted_side = map(list, zip(*tuner.behaviours(pool, measured, "fine-tune planted")))
    clean_b, clean_f, *clean_side = map(list, zip(*tuner.behaviours(clean_pool, measured, "fine-tune clean")))
    effect = planting_effect(clean_b, planted_b)
    print(f"behaviour: clean {np.mean(clean_b):.4f} ± {np.std(clean_b):.4f}, planted {np.mean(planted_b):.4f} ± "
        f"{np.std(planted_b):.4f}; planting {'raised' if effect['raised'] else 'did NOT raise'} it "
        f"(effect size {effect['effect_size']:.1f} seed sd)")
    section = {"metric": "paired log-prob gap" if cfg.paired else "probe projection of own answers",
               "clean": clean_b, "planted": planted_b, **effect, "removal": {},
               "concept_shift": {"clean": clean_f, "planted": planted_f, **planting_effect(clean_f, planted_f)},
               "side": {name: {"clean": c, "planted": p, **planting_effect(c, p)}
                        for name, c, p in zip(side, clean_side, planted_side)}}
    for name, s in scores.items():
        section["removal"][name] = {}
        for fraction in cfg.remove_fractions:
            drop = set(removal_indices(s, remove_top=fraction).tolist())
            kept = [t for i, t in enumerate(pool) if i not in drop]
            values = tuner.behaviours(kept, behaviour, f"retrain without top {fraction:.0%} of {name}")
            shares = [(np.mean(planted_b) - v) / effect["gain"] for v in values] if effect["gain"] else [float("nan")]
            section["removal"][name][str(fraction)] = {
                "behaviour": values, "mean": float(np.mean(values)), "sd": float(np.std(values)),
                "planted_removed": int(sum(labels[i] for i in drop)),
                "share_of_gain_removed": float(np.mean(shares)), "share_sd": float(np.std(shares)),
            }
    return section


def concept_lds(tuner: Finetuner, concept: ConceptFunction, pool: list[TokenizedExample],
                 scores: dict[str, np.ndarray], cfg: PlantedConfig) -> dict:
    """Fine-tune on ``cfg.lds`` random subsets (``cfg.lds_fraction`` of the pool) with ``cfg.lds_seeds`` seeds
    each; Spearman between Σ scores of the kept examples and the measured f (mean over the seeds), and the ceiling:
    the Spearman between the means of two disjoint halves of the seeds on the same subsets (with 2 seeds: seed vs
    seed), which is what a perfect estimator could reach against a measurement averaged over half the seeds (so a
    lower bound of what it could reach against the mean over all of them)."""
    rng = np.random.default_rng(cfg.seed + 1)
    masks, measured = [], []
    for m in range(cfg.lds):
        mask = np.zeros(len(pool), dtype=bool)
        mask[rng.choice(len(pool), max(1, round(cfg.lds_fraction * len(pool))), replace=False)] = True
        kept = [t for t, keep in zip(pool, mask) if keep]
        per_seed = []
        for s in range(cfg.lds_seeds):
            tuner.finetune(kept, cfg.seed + s, f"LDS subset {m + 1}/{cfg.lds} (seed {s})")
            per_seed.append(float(concept.evaluate(tuner.adapter)[0]))
        measured.append(per_seed)
        masks.append(mask)
    masks_arr, by_seed = np.stack(masks), np.array(measured)
    mean = by_seed.mean(1)
    half = cfg.lds_seeds // 2
    ceiling = (float(spearmanr(by_seed[:, :half].mean(1), by_seed[:, half: 2 * half].mean(1))[0])
               if cfg.lds_seeds > 1 else float("nan"))
    return {"subsets": cfg.lds, "fraction": cfg.lds_fraction, "seeds": cfg.lds_seeds, "measured": measured, "ceiling": ceiling,
            "spearman": {name: float(spearmanr(masks_arr @ s, mean)[0]) for name, s in scores.items()}}
