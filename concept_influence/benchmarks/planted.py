"""The planted-data benchmark (DESIGN §3): does a ranking find the training data that causes a behaviour?

Protocol, for any two chat JSONL files (clean answers and planted-style answers):

1. split by prompt into a probe set, a pre-training set, a training pool and an evaluation set (no prompt in two
   splits); a share ``rate`` of the pool gets the planted answer (the ground truth);
2. train a byte-level BPE tokenizer, pre-train a small TransformerLens model on clean text, fine-tune it on the pool;
3. train a logistic probe for planted vs clean answers on the fine-tuned model's activations; the concept is the
   probe projection of the model's own answers to the evaluation prompts;
4. score the pool with every estimator; retrieval metrics against the planted labels;
5. behaviour (paired data: mean per-token log p(planted answer) − log p(clean answer) on the evaluation prompts;
   unpaired: mean probe projection of the model's own sampled answers) of clean and planted fine-tunes over seeds,
   and after removing the top of each ranking and fine-tuning again;
6. optional concept-LDS: fine-tune on random halves of the pool, Spearman of predicted vs measured concept.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr, ttest_ind

from probes import train_logistic_probe

from ..activations import collect_activations
from ..concepts import ConceptFunction
from ..curvature import fit_curvature
from ..data import ChatExample, DataError, TokenizedExample, iter_batches, tokenize_examples
from ..estimators import (ConceptGradDot, ConceptInfluence, GradDot, InfluenceFunction, LengthBaseline,
                          ProbeProjection, ProjectionDifference, RandomBaseline, TfidfBaseline)
from ..estimators.baselines import response_texts
from ..evaluation import retrieval_metrics
from ..fileio import atomic_write_text
from ..generation import sample_responses
from ..models import ModelAdapter
from ..plots import plot_behaviour_removal, plot_fast_vs_full, plot_pr_curves, plot_score_histograms
from ..smallmodel import build_small_model, seed_everything, train_bpe_tokenizer, train_model
from .speed import machine_description

__all__ = ["BenchmarkError", "PlantedConfig", "PlantedSplits", "split_planted", "run_planted", "format_report"]

CONCEPT_ESTIMATORS = ("concept_influence", "concept_grad_dot", "probe_projection", "projection_difference")


class BenchmarkError(ValueError):
    """A benchmark setting that cannot work (rate, sizes, seeds, layer); the message names the setting."""


@dataclass
class PlantedConfig:
    """Sizes, model and training settings of a planted benchmark run (all counts are prompts)."""

    rate: float = 0.1
    paired: bool = False
    n_probe: int = 400
    n_pretrain: int = 2500
    n_pool: int = 1200
    n_eval: int = 200
    n_test: int = 64
    vocab_size: int = 2048
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    max_length: int = 256
    layer: int | None = None
    pretrain_epochs: int = 2
    finetune_epochs: int = 2
    pretrain_lr: float = 2e-3
    finetune_lr: float = 1e-3
    batch_size: int = 16
    max_new_tokens: int = 64
    n_seeds: int = 3
    remove_fractions: tuple[float, ...] = (0.1,)
    lds: int = 0
    seed: int = 0
    sae_latents: int = 0  # > 0: the SAE stage (benchmarks/sae.py) with an SAE of this many latents
    sae_k: int = 16
    sae_epochs: float = 10.0
    retrain: bool = True  # False: skip the behaviour measurement and filter-and-retrain

    def __post_init__(self):
        if not 0 < self.rate <= 0.5:
            raise BenchmarkError(f"--rate must be in (0, 0.5], got {self.rate}")
        if self.n_seeds < 1:
            raise BenchmarkError(f"--n-seeds must be at least 1, got {self.n_seeds}")
        if any(not 0 < f < 1 for f in self.remove_fractions):
            raise BenchmarkError(f"--remove-fractions must be in (0, 1), got {list(self.remove_fractions)}")
        if self.lds == 1 or self.lds < 0:
            raise BenchmarkError(f"--lds needs at least 2 subsets (or 0 for none), got {self.lds}")
        if self.sae_latents < 0 or (self.sae_latents and not 1 <= self.sae_k <= self.sae_latents):
            raise BenchmarkError(f"--sae-latents must be >= 0 and --sae-k in 1..sae-latents, got {self.sae_latents} "
                                 f"and {self.sae_k}")
        self.remove_fractions = tuple(self.remove_fractions)

    @property
    def n_planted(self) -> int:
        return round(self.rate * self.n_pool)

    @property
    def probe_layer(self) -> int:
        """The probe's block: ``layer`` or the middle block."""
        layer = (self.n_layers - 1) // 2 if self.layer is None else self.layer
        if not 0 <= layer < self.n_layers:
            raise BenchmarkError(f"--layer {layer} is outside the model's blocks 0..{self.n_layers - 1}")
        return layer

    @classmethod
    def quick(cls, **overrides) -> "PlantedConfig":
        """A reduced size for tests (well under a minute on 2 cores)."""
        small = dict(n_probe=40, n_pretrain=120, n_pool=120, n_eval=16, n_test=16, vocab_size=400, n_layers=2,
                     d_model=32, n_heads=2, max_length=128, pretrain_epochs=2, finetune_epochs=2, pretrain_lr=3e-3,
                     finetune_lr=3e-3, max_new_tokens=24, n_seeds=3)
        return cls(**{**small, **overrides})


@dataclass
class PlantedSplits:
    """The benchmark's data, split by prompt. ``planted[i]`` is 1 when ``pool[i]`` has the planted answer;
    ``eval_planted`` (paired data only) holds the planted answers to the evaluation prompts."""

    probe_positive: list[ChatExample]
    probe_negative: list[ChatExample]
    pretrain: list[ChatExample]
    pool: list[ChatExample]
    planted: list[int]
    eval_clean: list[ChatExample]
    eval_planted: list[ChatExample] | None = None
    dropped_duplicates: dict[str, int] = field(default_factory=dict)


def _prompt_key(example: ChatExample) -> str:
    return "\n".join(" ".join(m["content"].split()).lower() for m in example.prompt_messages)


def _dedupe(examples: Sequence[ChatExample]) -> list[ChatExample]:
    seen, out = set(), []
    for ex in examples:
        key = _prompt_key(ex)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def _check_size(what: str, available: int, parts: dict[str, int]) -> None:
    need = sum(parts.values())
    if need > available:
        detail = ", ".join(f"{k} {v}" for k, v in parts.items())
        raise DataError(f"too few examples: {what} has {available} usable prompts after deduplication, the splits "
                        f"need {need} ({detail}); lower --n-pool / --n-pretrain / --n-probe / --n-eval")


def split_planted(clean: Sequence[ChatExample], planted: Sequence[ChatExample], cfg: PlantedConfig,
                  clean_name: str = "clean file", planted_name: str = "planted file") -> PlantedSplits:
    """Deduplicate prompts and split them (seeded by ``cfg.seed``) into probe, pre-training, pool and evaluation
    sets. With ``cfg.paired`` the i-th examples of both files must answer the same prompt (:class:`DataError`
    names the first line where they do not); a prompt's two answers then never fall into different splits."""
    n_planted, n_clean_pool = cfg.n_planted, cfg.n_pool - cfg.n_planted
    if n_planted < 1 or n_clean_pool < 1:
        raise BenchmarkError(f"a pool of {cfg.n_pool} at rate {cfg.rate} has {n_planted} planted and {n_clean_pool} "
                         "clean examples; both must be at least 1")
    rng = random.Random(cfg.seed)
    if cfg.paired:
        if len(clean) != len(planted):
            raise DataError(f"--paired files differ in length: {clean_name} has {len(clean)} examples, "
                            f"{planted_name} has {len(planted)}")
        for c, p in zip(clean, planted):
            if c.prompt_messages != p.prompt_messages:
                raise DataError(f"--paired files do not line up: {c.id} and {p.id} have different prompts "
                                f"({c.prompt[:60]!r} vs {p.prompt[:60]!r})")
        index = {c.id: i for i, c in enumerate(clean)}
        unique = [index[c.id] for c in _dedupe(clean)]
        _check_size(clean_name, len(unique), {"probe": cfg.n_probe, "eval": cfg.n_eval, "pretrain": cfg.n_pretrain,
                                              "pool": cfg.n_pool})
        rng.shuffle(unique)
        cuts = np.cumsum([cfg.n_probe, cfg.n_eval, cfg.n_pretrain, cfg.n_pool])
        probe, evals, pretrain, pool = (unique[a:b] for a, b in zip([0, *cuts[:-1]], cuts))
        planted_idx = set(rng.sample(range(cfg.n_pool), n_planted))
        labels = [int(k in planted_idx) for k in range(cfg.n_pool)]
        return PlantedSplits(
            probe_positive=[planted[i] for i in probe], probe_negative=[clean[i] for i in probe],
            pretrain=[clean[i] for i in pretrain],
            pool=[planted[i] if lab else clean[i] for i, lab in zip(pool, labels)], planted=labels,
            eval_clean=[clean[i] for i in evals], eval_planted=[planted[i] for i in evals],
            dropped_duplicates={clean_name: len(clean) - len(unique)})

    clean_u = _dedupe(clean)
    clean_keys = {_prompt_key(c) for c in clean_u}
    planted_u = [p for p in _dedupe(planted) if _prompt_key(p) not in clean_keys]
    _check_size(clean_name, len(clean_u), {"probe": cfg.n_probe, "eval": cfg.n_eval, "pretrain": cfg.n_pretrain,
                                           "clean part of the pool": n_clean_pool})
    _check_size(planted_name, len(planted_u), {"probe": cfg.n_probe, "planted part of the pool": n_planted})
    rng.shuffle(clean_u)
    rng.shuffle(planted_u)
    cuts = np.cumsum([cfg.n_probe, cfg.n_eval, cfg.n_pretrain, n_clean_pool])
    probe_neg, evals, pretrain, pool_clean = (clean_u[a:b] for a, b in zip([0, *cuts[:-1]], cuts))
    probe_pos, pool_planted = planted_u[: cfg.n_probe], planted_u[cfg.n_probe : cfg.n_probe + n_planted]
    pool = [(ex, 0) for ex in pool_clean] + [(ex, 1) for ex in pool_planted]
    rng.shuffle(pool)
    return PlantedSplits(
        probe_positive=probe_pos, probe_negative=probe_neg, pretrain=pretrain, pool=[ex for ex, _ in pool],
        planted=[lab for _, lab in pool], eval_clean=evals,
        dropped_duplicates={clean_name: len(clean) - len(clean_u), planted_name: len(planted) - len(planted_u)})


def _effect(clean: Sequence[float], planted: Sequence[float]) -> dict:
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


class _Finetuner:
    """Fine-tunes copies of the pre-trained model (restoring its weights each time)."""

    def __init__(self, adapter: ModelAdapter, cfg: PlantedConfig, progress: bool):
        self.adapter, self.cfg, self.progress = adapter, cfg, progress
        self.pretrained = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}

    def finetune(self, examples: Sequence[TokenizedExample], seed: int, desc: str = "fine-tune") -> None:
        self.adapter.model.load_state_dict(self.pretrained)
        train_model(self.adapter, examples, self.cfg.finetune_epochs, self.cfg.finetune_lr, self.cfg.batch_size,
                    tokens="response", seed=seed, progress=self.progress, desc=desc)

    def behaviours(self, examples: Sequence[TokenizedExample], measure: Callable[[], float], desc: str) -> list[float]:
        """``measure()`` after fine-tuning on ``examples`` with each of the run's seeds."""
        out = []
        for s in range(self.cfg.n_seeds):
            self.finetune(examples, self.cfg.seed + s, f"{desc} (seed {s})")
            out.append(measure())
        return out


@torch.no_grad()
def _mean_loss(adapter: ModelAdapter, examples: Sequence[TokenizedExample], batch_size: int) -> np.ndarray:
    return np.concatenate([adapter.per_example_loss(b).double().cpu().numpy()
                           for b in iter_batches(examples, batch_size, adapter.pad_token_id)])


def _tokenize(examples, tokenizer, cfg, what: str) -> list[TokenizedExample]:
    out = tokenize_examples(examples, tokenizer, cfg.max_length, skip_truncated=True)
    if not out:
        raise DataError(f"no {what} example fits in {cfg.max_length} tokens")
    return out


def run_planted(clean: Sequence[ChatExample], planted: Sequence[ChatExample], out: str | Path,
                config: PlantedConfig | None = None, *, progress: bool = True, command: str | None = None,
                data_names: tuple[str, str] = ("clean file", "planted file")) -> dict:
    """Run the benchmark into ``out`` (``results.json``, ``results.md``, plots, scores, probe, tokenizer);
    returns the results."""
    cfg = config or PlantedConfig()
    out = Path(out)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    splits = split_planted(clean, planted, cfg, *data_names)
    print(f"splits: probe {len(splits.probe_positive)}+{len(splits.probe_negative)}, pre-train {len(splits.pretrain)}, "
        f"pool {len(splits.pool)} ({sum(splits.planted)} planted), eval {len(splits.eval_clean)}")

    texts = [f"{c.prompt}\n{c.response}" for c in splits.pretrain + splits.probe_positive + splits.probe_negative]
    tokenizer = train_bpe_tokenizer(texts, out / "tokenizer", cfg.vocab_size)
    pool_tk = tokenize_examples(splits.pool, tokenizer, cfg.max_length, skip_truncated=True)
    kept = {t.id for t in pool_tk}
    labels = [lab for ex, lab in zip(splits.pool, splits.planted) if ex.id in kept]
    if sum(labels) == 0 or sum(labels) == len(labels):
        raise DataError(f"after dropping responses longer than max_length {cfg.max_length}, the pool has "
                        f"{sum(labels)} planted of {len(labels)}; raise --max-length")
    tk = {"pretrain": _tokenize(splits.pretrain, tokenizer, cfg, "pre-training"),
          "pos": _tokenize(splits.probe_positive, tokenizer, cfg, "probe-positive"),
          "neg": _tokenize(splits.probe_negative, tokenizer, cfg, "probe-negative"),
          "eval": _tokenize(splits.eval_clean, tokenizer, cfg, "evaluation")}
    if splits.eval_planted is not None:  # keep only evaluation prompts whose two answers both fit
        clean_tk = {t.id: t for t in tk["eval"]}
        planted_tk = {t.id: t for t in _tokenize(splits.eval_planted, tokenizer, cfg, "evaluation")}
        pairs = [(clean_tk[c.id], planted_tk[p.id]) for c, p in zip(splits.eval_clean, splits.eval_planted)
                 if c.id in clean_tk and p.id in planted_tk]
        if not pairs:
            raise DataError(f"no evaluation prompt has both answers within {cfg.max_length} tokens; raise --max-length")
        tk["eval"], tk["eval_planted"] = [c for c, _ in pairs], [p for _, p in pairs]

    adapter = build_small_model(tokenizer, cfg.n_layers, cfg.d_model, cfg.n_heads, n_ctx=cfg.max_length, seed=cfg.seed)
    t0 = time.perf_counter()
    pre_losses = train_model(adapter, tk["pretrain"], cfg.pretrain_epochs, cfg.pretrain_lr, cfg.batch_size,
                             tokens="all", seed=cfg.seed, progress=progress, desc="pre-train")
    print(f"pre-trained {cfg.n_layers} blocks d{cfg.d_model} on {len(tk['pretrain'])} clean chats: loss "
        f"{pre_losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")

    tuner = _Finetuner(adapter, cfg, progress)
    t0 = time.perf_counter()
    tuner.finetune(pool_tk, cfg.seed, "fine-tune (planted pool)")
    finetune_seconds = time.perf_counter() - t0
    print(f"fine-tuned on the pool ({finetune_seconds:.0f} s)")

    hook = f"blocks.{cfg.probe_layer}.hook_resid_post"
    acts = [collect_activations(adapter, tk[k], hook, progress=False) for k in ("pos", "neg")]
    probe = train_logistic_probe(acts[0], acts[1], hook, seed=cfg.seed)
    probe.direction.metadata["name"] = "planted_probe"
    probe.direction.save(out / "probe.safetensors")
    print(f"probe at {hook}: held-out accuracy {probe.metrics['accuracy']:.3f}, AUROC {probe.metrics['roc_auc']:.3f}")
    own = sample_responses(adapter, tk["eval"], cfg.max_new_tokens, seed=cfg.seed, progress=False,
                               min_new_tokens=1)
    concept = ConceptFunction.from_directions(probe.direction, eval_examples=own)

    def behaviour() -> float:
        """Paired: mean per-token log p(planted) − log p(clean) answer; unpaired: concept on the model's own answers."""
        if splits.eval_planted is not None:
            return float(np.mean(_mean_loss(adapter, tk["eval"], cfg.batch_size)
                                 - _mean_loss(adapter, tk["eval_planted"], cfg.batch_size)))
        answers = sample_responses(adapter, tk["eval"], cfg.max_new_tokens, seed=cfg.seed, progress=False,
                                   min_new_tokens=1)
        return float(concept.evaluate(adapter, answers)[0])

    t0 = time.perf_counter()
    curvature = fit_curvature(adapter, pool_tk, maps=adapter.linear_maps(), strategy="ekfac",
                              batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    fit_seconds = time.perf_counter() - t0
    test = (tk["eval_planted"] if splits.eval_planted is not None else tk["pos"])[: cfg.n_test]
    estimators = [
        ConceptInfluence(concept, curvature), ConceptGradDot(concept), InfluenceFunction(test, curvature),
        GradDot(test), ProbeProjection(concept),
        ProjectionDifference(concept, cfg.max_new_tokens, seed=cfg.seed, min_new_tokens=1),
        TfidfBaseline(response_texts(adapter, tk["pos"])), LengthBaseline(), RandomBaseline(cfg.seed),
    ]
    results: dict = {
        "command": command, "machine": machine_description(), "config": asdict(cfg), "data": list(data_names),
        "splits": {"probe": len(tk["pos"]), "pretrain": len(tk["pretrain"]), "pool": len(pool_tk),
                   "planted": int(sum(labels)), "eval": len(tk["eval"]), "dropped_duplicates": splits.dropped_duplicates,
                   "dropped_too_long_from_pool": len(splits.pool) - len(pool_tk)},
        "probe": {"hook_name": hook, **probe.metrics}, "concept_value": float(concept.evaluate(adapter)[0]),
        "ekfac_fit_seconds": fit_seconds, "finetune_seconds": finetune_seconds, "estimators": {},
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
        from .sae import SAE_ESTIMATORS, sae_section

        results["sae"] = sae_section(adapter, hook, (tk["pos"], tk["neg"]), pool_tk, labels, own, probe.direction,
                                     curvature, scores, results["estimators"], cfg, out, progress)
    print("\n" + format_retrieval(results))
    _write(out, results)

    if cfg.retrain:
        results["behaviour"] = _behaviour_section(tuner, behaviour, pool_tk, labels, scores, cfg)
        _write(out, results)
    if cfg.lds:  # the SAE estimators predict another concept than the one measured here
        probe_scores = {k: v for k, v in scores.items() if not (cfg.sae_latents and k in SAE_ESTIMATORS)}
        results["lds"] = _concept_lds(tuner, concept, pool_tk, probe_scores, cfg)
    results["plots"] = _plots(out, scores, labels, results)
    results["total_seconds"] = time.perf_counter() - started
    _write(out, results)
    print(f"\nresults: {out / 'results.md'} ({results['total_seconds']:.0f} s in all)")
    return results


def _behaviour_section(tuner: _Finetuner, behaviour: Callable[[], float], pool: list[TokenizedExample],
                       labels: list[int], scores: dict[str, np.ndarray], cfg: PlantedConfig) -> dict:
    """Behaviour of clean and planted fine-tunes over seeds, then after removing the top of each ranking."""
    clean_pool = [t for t, lab in zip(pool, labels) if not lab]
    planted_b = tuner.behaviours(pool, behaviour, "fine-tune planted")
    clean_b = tuner.behaviours(clean_pool, behaviour, "fine-tune clean")
    effect = _effect(clean_b, planted_b)
    print(f"behaviour: clean {np.mean(clean_b):.4f} ± {np.std(clean_b):.4f}, planted {np.mean(planted_b):.4f} ± "
        f"{np.std(planted_b):.4f}; planting {'raised' if effect['raised'] else 'did NOT raise'} it "
        f"(effect size {effect['effect_size']:.1f} seed sd)")
    section = {"metric": "paired log-prob gap" if cfg.paired else "probe projection of own answers",
               "clean": clean_b, "planted": planted_b, **effect, "removal": {}}
    for name, s in scores.items():
        section["removal"][name] = {}
        order = np.argsort(-s, kind="stable")
        for fraction in cfg.remove_fractions:
            drop = set(order[: round(fraction * len(pool))].tolist())
            kept = [t for i, t in enumerate(pool) if i not in drop]
            values = tuner.behaviours(kept, behaviour, f"retrain without top {fraction:.0%} of {name}")
            shares = [(np.mean(planted_b) - v) / effect["gain"] for v in values] if effect["gain"] else [float("nan")]
            section["removal"][name][str(fraction)] = {
                "behaviour": values, "mean": float(np.mean(values)), "sd": float(np.std(values)),
                "planted_removed": int(sum(labels[i] for i in drop)),
                "share_of_gain_removed": float(np.mean(shares)), "share_sd": float(np.std(shares)),
            }
    return section


def _concept_lds(tuner: _Finetuner, concept: ConceptFunction, pool: list[TokenizedExample],
                 scores: dict[str, np.ndarray], cfg: PlantedConfig) -> dict:
    """Fine-tune on ``cfg.lds`` random halves; Spearman between Σ scores of the kept examples and the measured f."""
    rng = np.random.default_rng(cfg.seed + 1)
    masks, measured = [], []
    for m in range(cfg.lds):
        mask = np.zeros(len(pool), dtype=bool)
        mask[rng.choice(len(pool), len(pool) // 2, replace=False)] = True
        tuner.finetune([t for t, keep in zip(pool, mask) if keep], cfg.seed, f"LDS subset {m + 1}/{cfg.lds}")
        measured.append(float(concept.evaluate(tuner.adapter)[0]))
        masks.append(mask)
    masks_arr = np.stack(masks)
    return {"subsets": cfg.lds, "measured": measured,
            "spearman": {name: float(spearmanr(masks_arr @ s, measured)[0]) for name, s in scores.items()}}


def _plots(out: Path, scores: dict[str, np.ndarray], labels: list[int], results: dict) -> dict[str, str]:
    plots = {"pr_curves": plot_pr_curves(scores, labels, out / "pr_curves.png"),
             "score_histograms": plot_score_histograms(scores, labels, out / "score_histograms.png"),
             "fast_vs_full": plot_fast_vs_full(("concept_influence", scores["concept_influence"]),
                                               {k: scores[k] for k in ("probe_projection", "projection_difference")},
                                               labels, out / "fast_vs_full.png")}
    b = results.get("behaviour")
    if b:
        points = {name: {float(f): r["behaviour"] for f, r in by_f.items()} for name, by_f in b["removal"].items()}
        plots["behaviour_removal"] = plot_behaviour_removal(points, b["clean"], b["planted"],
                                                            out / "behaviour_removal.png", ylabel=b["metric"])
    return {k: p.name for k, p in plots.items()}


def _write(out: Path, results: dict) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(out / "results.md", format_report(results))


def format_retrieval(results: dict) -> str:
    """The estimators' retrieval metrics as a fixed-width table."""
    head = f"{'estimator':<30} {'AUROC':>6} {'AUPRC':>6} {'P@k':>6} {'s/1k ex':>8}"
    rows = [head, "-" * len(head)]
    for name, m in results["estimators"].items():
        rows.append(f"{name:<30} {m['auroc']:>6.3f} {m['auprc']:>6.3f} {m['precision_at_k']:>6.3f} "
                    f"{m['seconds_per_1k']:>8.2f}")
    return "\n".join(rows)


def format_report(results: dict) -> str:
    """``results.md``: what ran, whether planting raised the behaviour, retrieval, filter-and-retrain, LDS."""
    cfg, sp = results["config"], results["splits"]
    lines = ["# Planted-data benchmark", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    m = results["machine"]
    machine = (f"{m['cpu']}, {m['usable_cores']} cores, torch {m['torch']} on {m['torch_threads']} thread(s), "
               f"Python {m['python']}, load average {m['load_average_start'][0]:.1f} at the start")
    lines += [f"Machine: {machine}" + (f"; {results['total_seconds'] / 60:.1f} min in all"
                                                 if "total_seconds" in results else " (run in progress)"), "",
              f"Data: {' + '.join(results['data'])} ({'paired' if cfg['paired'] else 'unpaired'}); rate {cfg['rate']}; "
              f"pool {sp['pool']} ({sp['planted']} planted), pre-train {sp['pretrain']}, probe {sp['probe']} per class, "
              f"eval {sp['eval']}; seed {cfg['seed']}.", "",
              f"Model: TransformerLens, {cfg['n_layers']} blocks, d_model {cfg['d_model']}, vocab {cfg['vocab_size']}; "
              f"pre-train {cfg['pretrain_epochs']} epochs, fine-tune {cfg['finetune_epochs']} epochs. "
              f"Probe at `{results['probe']['hook_name']}`: held-out accuracy {results['probe']['accuracy']:.3f}, "
              f"AUROC {results['probe']['roc_auc']:.3f}. EK-FAC fit {results['ekfac_fit_seconds']:.1f} s; "
              f"one fine-tune {results['finetune_seconds']:.1f} s.", ""]
    b = results.get("behaviour")
    if b:
        verdict = ("**Planting raised the behaviour**" if b["raised"] else
                   "**Planting did NOT raise the behaviour** measurably, so the removal numbers below do not show "
                   "causation; the retrieval table only says whether a ranking recovers the planted labels")
        lines += ["## Behaviour", "",
                  f"Metric: {b['metric']} on the evaluation prompts, over {len(b['clean'])} fine-tuning seeds.", "",
                  f"- clean fine-tune: {np.mean(b['clean']):.4f} ± {np.std(b['clean']):.4f}",
                  f"- planted fine-tune: {np.mean(b['planted']):.4f} ± {np.std(b['planted']):.4f}",
                  f"- gain {b['gain']:.4f} = {b['effect_size']:.1f} × the seeds' sd (one-sided Welch p = {b['p_value']:.2g})",
                  "", verdict + ".", ""]
    elif not cfg.get("retrain", True):
        lines += ["Behaviour and filter-and-retrain were not run (`--no-retrain`).", ""]
    fractions = [str(f) for f in cfg["remove_fractions"]]
    head = "| estimator | AUROC | AUPRC | P@k | s/1k ex |"
    sep = "|---|---|---|---|---|"
    if b:
        for f in fractions:
            head += f" gain removed (top {float(f):.0%}) |"
            sep += "---|"
    lines += ["## Retrieval and filter-and-retrain", "", head, sep]
    for name, m in results["estimators"].items():
        row = f"| {name} | {m['auroc']:.3f} | {m['auprc']:.3f} | {m['precision_at_k']:.3f} | {m['seconds_per_1k']:.2f} |"
        if b:
            for f in fractions:
                r = b["removal"][name][f]
                share = f"{r['share_of_gain_removed']:.0%} ± {r['share_sd']:.0%}" if b["raised"] else "n/a"
                row += f" {share} ({r['planted_removed']} planted) |"
        lines.append(row)
    lines += ["", "P@k: precision among the top k = number planted. Gain removed: (planted − after removal) / "
              "(planted − clean), mean ± sd over seeds (n/a when planting did not raise the behaviour; the values "
              "are in results.json); in brackets the planted examples among those removed.", ""]
    if "lds" in results:
        lines += ["## Concept-LDS", "", f"{results['lds']['subsets']} random halves of the pool; Spearman between the "
                  "summed scores of the kept examples and the concept measured after fine-tuning on them. "
                  "Only the concept estimators predict this quantity; the others are shown for reference.", "",
                  "| estimator | Spearman |", "|---|---|"]
        lines += [f"| {n}{'' if n in CONCEPT_ESTIMATORS else ' (not a concept estimator)'} | {r:.3f} |"
                  for n, r in results["lds"]["spearman"].items()]
        lines.append("")
    if "sae" in results:
        from .sae import format_sae_report

        lines += format_sae_report(results)
    if "plots" in results:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in results["plots"].items()] + [""]
    return "\n".join(lines)


def command_line() -> str:
    """The command that started this process, for the report."""
    return "concept-influence " + " ".join(shlex.quote(a) for a in sys.argv[1:])
