"""The speed benchmark's shared setup: its configuration, part A's stage names, the data and the models."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

from concept_influence.activations import collect_activations
from concept_influence.concepts import ConceptFunction
from concept_influence.data import TokenizedExample, tokenize_examples
from concept_influence.models import HFCausalLMAdapter, ModelAdapter
from concept_influence.toy.demo_corpus import make_demo_corpus
from concept_influence.toy.small_model import build_small_model, load_tokenizer, train_bpe_tokenizer, train_model
from probes import train_logistic_probe

__all__ = ["SpeedConfig", "STAGES_A", "SpeedData", "speed_concept", "count_tokens", "prepare_speed_data",
           "tl_speed_adapter", "llama_speed_adapter", "trained_speed_model", "map_names_by_module"]

STAGES_A = ("train_step", "concept_influence", "probe_projection", "ekfac_fit")


@dataclass
class SpeedConfig:
    """Sizes of the benchmark. Part A scores ``n_train`` examples, part B the first ``kron_n_train``."""

    n_train: int = 1000
    n_probe: int = 150
    n_eval: int = 48
    vocab_size: int = 1024
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    concept_layer: int = 1
    max_length: int = 128
    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 16
    rounds: int = 3
    kron_n_train: int = 400
    kron_rounds: int = 2
    memory_examples: int = 128
    threads: int = 1
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> "SpeedConfig":
        """A reduced size for smoke tests (about a minute on 2 cores without kronfluence)."""
        return cls(n_train=160, n_probe=60, n_eval=16, vocab_size=512, n_layers=2, d_model=64, concept_layer=0,
                   epochs=1, rounds=2, kron_n_train=96, kron_rounds=1, memory_examples=32, seed=seed)

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.concept_layer}.hook_resid_post"


@dataclass
class SpeedData:
    tokenizer: object
    train: list[TokenizedExample]
    probe_positive: list[TokenizedExample]
    probe_negative: list[TokenizedExample]
    evals: list[TokenizedExample]


# ---- data and models ---------------------------------------------------------------------------------


def prepare_speed_data(cfg: SpeedConfig, work: Path, train_tokenizer: bool) -> SpeedData:
    corpus = make_demo_corpus(cfg.n_train, 0.1, cfg.n_probe, cfg.n_eval, cfg.seed)
    if train_tokenizer:
        texts = [f"{c.prompt}\n{c.response}" for c in corpus.train + corpus.probe_positive + corpus.probe_negative]
        tokenizer = train_bpe_tokenizer(texts, work / "tokenizer", cfg.vocab_size)
    else:
        tokenizer = load_tokenizer(work / "tokenizer")
    tok = partial(tokenize_examples, tokenizer=tokenizer, max_length=cfg.max_length)
    return SpeedData(tokenizer, tok(corpus.train), tok(corpus.probe_positive), tok(corpus.probe_negative),
                 tok(corpus.eval_prompts))


def tl_speed_adapter(cfg: SpeedConfig, tokenizer) -> ModelAdapter:
    return build_small_model(tokenizer, cfg.n_layers, cfg.d_model, cfg.n_heads, n_ctx=cfg.max_length, seed=cfg.seed)


def llama_speed_adapter(cfg: SpeedConfig, tokenizer) -> HFCausalLMAdapter:
    """A Llama-style causal LM of the same size, with no biases (so both tools track the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_length, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return HFCausalLMAdapter(LlamaForCausalLM(config).eval(), tokenizer)


def trained_speed_model(adapter: ModelAdapter, cfg: SpeedConfig, data: SpeedData) -> ModelAdapter:
    train_model(adapter, data.train, cfg.epochs, cfg.lr, cfg.batch_size, tokens="all", seed=cfg.seed, progress=False)
    return adapter


def speed_concept(adapter: ModelAdapter, cfg: SpeedConfig, data: SpeedData, direction_path: Path) -> tuple[ConceptFunction, dict]:
    """A logistic probe for the demo trait at the concept hook (saved to ``direction_path``) as a concept."""
    acts = [collect_activations(adapter, ex, cfg.hook_name, progress=False) for ex in (data.probe_positive, data.probe_negative)]
    probe = train_logistic_probe(acts[0], acts[1], cfg.hook_name, seed=cfg.seed)
    probe.direction.save(direction_path)
    return ConceptFunction.from_directions(probe.direction, eval_examples=data.evals), probe.metrics


def map_names_by_module(adapter: HFCausalLMAdapter, max_block: int, root) -> dict[str, str]:
    """Our name of each linear map of blocks ``0..max_block``, keyed by its module's path under ``root`` (the name
    another library, given ``root``, tracks it by)."""
    ours = {id(m.input_module): m.name for m in adapter.linear_maps(max_block)}
    return {name: ours[id(mod)] for name, mod in root.named_modules() if id(mod) in ours}


def count_tokens(examples: Sequence[TokenizedExample]) -> int:
    return sum(len(e.input_ids) for e in examples)
