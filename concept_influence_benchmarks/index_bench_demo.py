"""The index benchmark on a planted benchmark, the demo's by default: its planted data and training (pre-train on clean
answers, fine-tune on a pool with planted ones), its concept (difference of means at the last block, read at the last
prompt token of the model's own answers) and its test examples (the planted answers to held-out prompts), made as
``run_planted`` makes them (:func:`planted_setup`; the medical benchmark's in :mod:`.index_bench_medical`). Every
projection at equal bytes against exact Concept Influence, classic influence and (the demo) their sum over the
pre-trained and the fine-tuned model (Spearman, and the planted AUROC beside the exact estimator's); on a Llama of the
demo's size trained the same way, ours against Bergson's index at the same bytes and precision."""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from scipy.stats import spearmanr

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import fit_curvature
from concept_influence.demo import demo_config
from concept_influence.estimators import ConceptInfluence, InfluenceFunction, OverCheckpoints
from concept_influence.evaluation import retrieval_metrics
from concept_influence.index import GradientIndex, IndexSettings
from concept_influence.models import HFCausalLMAdapter
from concept_influence.planted.concept_stage import planted_concept
from concept_influence.planted.experiment_config import PlantedConfig
from concept_influence.planted.finetuning import Finetuner
from concept_influence.planted.splits import split_planted, tokenize_splits
from concept_influence.toy.demo_corpus import make_paired_demo_corpus
from concept_influence.toy.small_model import build_small_model, seed_everything, train_bpe_tokenizer, train_model

__all__ = ["PlantedSetup", "planted_setup", "demo_setup", "index_study", "demo_study"]


@dataclass
class PlantedSetup:
    """A trained planted-benchmark model with its pool, planted labels, concept, test examples and pre-trained
    weights."""

    adapter: object
    pool: list
    labels: np.ndarray
    concept: ConceptFunction
    test: list
    pretrained: dict


def _llama(tokenizer, cfg, seed: int) -> HFCausalLMAdapter:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.max_length, tie_word_embeddings=False)
    return HFCausalLMAdapter(LlamaForCausalLM(config).eval(), tokenizer)


def planted_setup(clean: list, planted: list, cfg: PlantedConfig, arch: str, work: Path) -> PlantedSetup:
    """The planted benchmark's splits, tokenizer, pre-training, fine-tune on the pool, probe and concept as
    ``run_planted`` makes them from ``clean`` and ``planted`` chats with ``cfg`` (its seed), on the benchmark's
    TransformerLens model or (``arch`` ``llama``) a Llama of the same size; the tokenizer is written under ``work``."""
    seed = cfg.seed
    seed_everything(seed)
    splits = split_planted(clean, planted, cfg)
    texts = [f"{c.prompt}\n{c.response}" for c in splits.pretrain + splits.probe_positive + splits.probe_negative]
    tokenizer = train_bpe_tokenizer(texts, work / f"tokenizer-{seed}", cfg.vocab_size)
    pool, labels, tk = tokenize_splits(splits, tokenizer, cfg)
    adapter = (_llama(tokenizer, cfg, seed) if arch == "llama" else
               build_small_model(tokenizer, cfg.n_layers, cfg.d_model, cfg.n_heads, n_ctx=cfg.max_length, seed=seed))
    train_model(adapter, tk["pretrain"], cfg.pretrain_epochs, cfg.pretrain_lr, cfg.batch_size, tokens="all", seed=seed,
                progress=False)
    tuner = Finetuner(adapter, cfg, progress=False)
    tuner.finetune(pool, seed)
    concept = planted_concept(adapter, tk, cfg)[2]
    return PlantedSetup(adapter, pool, np.array(labels), concept, tk["test"], tuner.pretrained)


def demo_setup(seed: int, quick: bool, arch: str, work: Path) -> PlantedSetup:
    """:func:`planted_setup` on the demo's corpus at the sizes of ``concept-influence demo`` (or ``--quick``'s)."""
    cfg = demo_config(quick, seed)
    clean, trait = make_paired_demo_corpus(int((cfg.n_probe + cfg.n_pretrain + cfg.n_pool + cfg.n_eval) * 1.1) + 20, seed)
    return planted_setup(clean, trait, cfg, arch, work)


def _exact(s: PlantedSetup):
    """The EK-FAC fitted on the pool (every weight matrix), the two queries (the concept; the test answers' loss) and
    their exact scores."""
    curvature = fit_curvature(s.adapter, s.pool, s.adapter.linear_maps(), batch_size=8, progress=False)
    queries = {"concept_influence": ConceptInfluence(s.concept, curvature),
               "influence_function": InfluenceFunction(s.test, curvature)}
    return curvature, queries, {name: est.score(s.adapter, s.pool, progress=False).column(0)
                                for name, est in queries.items()}


def _compare(got: np.ndarray, exact: np.ndarray, labels: np.ndarray) -> dict:
    return {"spearman": float(spearmanr(got, exact).statistic), "auroc": retrieval_metrics(got, labels)["auroc"],
            "exact_auroc": retrieval_metrics(exact, labels)["auroc"]}


def index_study(s: PlantedSetup, ranks: tuple[int, ...], budget: int, work: Path, checkpoints: bool = True) -> dict:
    """Exact scores on the trained setup ``s``, then each projection and rank (float16, at equal bytes) and the
    default (``budget`` bytes), for Concept Influence and classic influence; with ``checkpoints``, also the default
    index summed over the pre-trained and the fine-tuned model."""
    ad, pool, labels = s.adapter, s.pool, s.labels
    curvature, queries, exact = _exact(s)
    out = {"n_pool": len(pool), "n_planted": int(labels.sum()), "rows": []}

    def measure(index, label: str, **extra):
        for name, est in queries.items():
            for curv in ("ekfac", "empirical") if extra.get("empirical") else ("ekfac",):
                got = index.score(est, ad, curvature=curv, progress=False).column(0)
                out["rows"].append({"variant": label, "curvature": curv, "query": name, "rank": index.store.manifest["rank"],
                                    "bytes": index.bytes_per_example, **_compare(got, exact[name], labels)})

    for rank in ranks:
        for projection in ("eigen", "random"):
            index = GradientIndex.build(work / f"{projection}-{rank}", ad, pool, curvature, progress=False,
                                        projection=projection, rank=rank)
            measure(index, f"{projection} r{rank}", empirical=projection == "random")
    measure(GradientIndex.build(work / "default", ad, pool, curvature, IndexSettings(budget=budget), progress=False),
            "default")
    out["full_bytes"] = 4 * sum(m.shape[0] * m.shape[1] for m in ad.linear_maps())
    if checkpoints:
        out["checkpoints"] = _checkpoint_rows(s, curvature, budget, work / "checkpoints")
    return out


def demo_study(seed: int, ranks: tuple[int, ...], budget: int, quick: bool, bergson: bool, work: Path) -> dict:
    """One demo seed: :func:`index_study` with the checkpoint sum; with ``bergson``, ours and Bergson's index on the
    Llama demo at equal rank and float32."""
    out = index_study(demo_setup(seed, quick, "tl", work), ranks, budget, work)
    if bergson:
        out["bergson"] = _bergson_rows(seed, ranks, quick, work)
    return out


def _checkpoint_rows(s: PlantedSetup, curvature, budget: int, path: Path) -> dict:
    """Concept Influence summed over the pre-trained and the fine-tuned model: exact (OverCheckpoints) and from one
    two-checkpoint index of the default size."""
    ad, pool = s.adapter, s.pool
    exact = OverCheckpoints(lambda: ConceptInfluence(s.concept, "ekfac"), [s.pretrained, None]).score(
        ad, pool, progress=False).column(0)
    own = {k: v.clone() for k, v in ad.model.state_dict().items()}
    models = []
    for weights, fitted in ((s.pretrained, None), (own, curvature)):
        ad.model.load_state_dict(weights)
        fitted = fitted or fit_curvature(ad, pool, ad.linear_maps(), batch_size=8, progress=False)
        GradientIndex.build(path, ad, pool, fitted, IndexSettings(budget=budget), progress=False)
        models.append(type(ad)(copy.deepcopy(ad.model), ad.tokenizer))
    got = GradientIndex(path).score(ConceptInfluence(s.concept, "ekfac"), models, progress=False).column(0)
    return _compare(got, exact, s.labels)


def _bergson_rows(seed: int, ranks: tuple[int, ...], quick: bool, work: Path) -> list[dict]:
    """On the Llama demo: our eigen index and Bergson's index at the same rank, float32 both."""
    from .bergson_index import build_bergson_index

    s = demo_setup(seed, quick, "llama", work)
    ad, pool, labels = s.adapter, s.pool, s.labels
    curvature, queries, exact = _exact(s)
    grads = {name: est.measurement(ad, ad.linear_maps(), 8, False)[0] for name, est in queries.items()}
    rows = []
    for rank in ranks:
        ours = GradientIndex.build(work / f"llama{seed}-{rank}", ad, pool, curvature, projection="eigen", rank=rank,
                                   dtype="float32", progress=False)
        theirs = build_bergson_index(ad, pool, ad.n_blocks - 1, rank, Path(tempfile.mkdtemp(dir=work)))
        for name, est in queries.items():
            for library, got in (("ours (eigen, EK-FAC)", ours.score(est, ad, progress=False).column(0)),
                                 ("Bergson 2.5.1", theirs.scores(grads[name])[0][:, 0])):
                rows.append({"library": library, "query": name, "rank": rank, "bytes": ours.bytes_per_example,
                             **_compare(got, exact[name], labels)})
    return rows


def median_rows(seeds: list[dict], key: str, group: tuple[str, ...]) -> list[SimpleNamespace]:
    """Rows of ``key`` of every seed grouped by ``group`` fields: the medians of spearman, auroc and exact_auroc."""
    groups: dict[tuple, list[dict]] = {}
    for result in seeds:
        for row in result[key]:
            groups.setdefault(tuple(row[g] for g in group), []).append(row)
    return [SimpleNamespace(**dict(zip(group, k)), bytes=rows[0].get("bytes"), n=len(rows),
                            **{m: float(np.median([r[m] for r in rows])) for m in ("spearman", "auroc", "exact_auroc")})
            for k, rows in groups.items()]
