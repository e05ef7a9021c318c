"""The planted benchmark's data: the medical benchmark's files, deduplicating the prompts, splitting them into probe,
pre-training, pool and evaluation, and tokenising the splits."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data import ChatExample, DataError, TokenizedExample, tokenize_examples
from .experiment_config import BenchmarkError, PlantedConfig

__all__ = ["PlantedSplits", "split_planted", "tokenize_splits", "medical_files"]


def medical_files(data: str | Path) -> list[Path]:
    """The medical benchmark's clean and planted files in the folder ``data``: the emergent-misalignment good and bad
    medical advice (paired)."""
    return [Path(data) / f"{kind}_medical_advice.jsonl.gz" for kind in ("good", "bad")]


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


def tokenize_splits(splits: PlantedSplits, tokenizer, cfg: PlantedConfig) -> tuple[list[TokenizedExample], list[int],
                                                                                   dict[str, list[TokenizedExample]]]:
    """The pool's examples that fit in ``cfg.max_length`` with their planted labels, and the other splits tokenised:
    ``pretrain``, ``pos`` and ``neg`` (the probe's), ``eval``, on paired data ``eval_planted`` (the evaluation prompts
    whose two answers both fit), and ``test``: the first ``cfg.n_test`` planted answers to evaluation prompts (unpaired:
    of the probe's positives), classic influence's test examples. A pool left with one class, or paired data left
    without an evaluation prompt, is a :class:`DataError`."""
    def fitting(examples):
        return tokenize_examples(examples, tokenizer, cfg.max_length, skip_truncated=True)

    pool = fitting(splits.pool)
    kept = {t.id for t in pool}
    labels = [lab for ex, lab in zip(splits.pool, splits.planted) if ex.id in kept]
    if sum(labels) == 0 or sum(labels) == len(labels):
        raise DataError(f"after dropping responses longer than max_length {cfg.max_length}, the pool has "
                        f"{sum(labels)} planted of {len(labels)}; raise --max-length")
    tk = {"pretrain": fitting(splits.pretrain) if splits.pretrain else [], "pos": fitting(splits.probe_positive),
          "neg": fitting(splits.probe_negative), "eval": fitting(splits.eval_clean)}
    if splits.eval_planted is not None:  # keep only evaluation prompts whose two answers both fit
        clean_tk = {t.id: t for t in tk["eval"]}
        planted_tk = {t.id: t for t in fitting(splits.eval_planted)}
        pairs = [(clean_tk[c.id], planted_tk[p.id]) for c, p in zip(splits.eval_clean, splits.eval_planted)
                 if c.id in clean_tk and p.id in planted_tk]
        if not pairs:
            raise DataError(f"no evaluation prompt has both answers within {cfg.max_length} tokens; raise --max-length")
        tk["eval"], tk["eval_planted"] = [c for c, _ in pairs], [p for _, p in pairs]
    tk["test"] = tk.get("eval_planted", tk["pos"])[: cfg.n_test]
    return pool, labels, tk
