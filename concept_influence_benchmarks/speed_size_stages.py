"""What the size benchmark (:mod:`.speed_sizes`) measures: the shapes, a randomly initialised bias-free Llama of one,
random token sequences and concept directions, and each stage as a function of the examples it runs on; also the
child process that measures one stage's memory alone."""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import torch

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import fit_curvature
from concept_influence.data import TokenizedExample
from concept_influence.engine import ScoringSettings
from concept_influence.estimators import ConceptInfluence, ProbeProjection
from concept_influence.models import HFCausalLMAdapter, ModelAdapter
from concept_influence.planted.experiment_config import BenchmarkError
from concept_influence.toy.small_model import train_model
from probes import ConceptDirection

from .bergson_bridge import bergson_concept_scores, bergson_unavailable
from .kronfluence_bridge import DAMPING_FACTOR, kronfluence_concept_scores
from .pass_costs import floor
from .speed_memory import measure_peak

__all__ = ["SIZES", "SizeConfig", "COMPARED_LIBRARIES", "size_model", "random_examples", "random_token_examples",
           "random_concept", "size_stages", "libraries", "compared", "selected", "memory_child"]

# Llama-style shapes (hidden, MLP, blocks, heads, key-value heads, vocabulary); "tiny" is for tests and smoke runs.
SIZES = {
    "gpt2-small": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=50257),
    "qwen-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}


@dataclass
class SizeConfig:
    """What the size benchmark measures; the defaults are the committed GPT-2-small run on a 2-core CPU."""

    size: str = "gpt2-small"
    n_examples: int = 32
    seq_len: int = 128
    batch_size: int = 8
    concept_layer: int = 3
    n_eval: int = 8
    many_concepts: int = 16
    query_rank: int = 8
    threads: int = 2
    seed: int = 0
    kronfluence: bool = True
    stages: tuple[str, ...] = field(default=())  # empty: all; the floor and the fit are always run
    rounds: int = 3  # runs of each compared K = 1 pipeline (ours, kronfluence, Bergson), in alternating order
    memory_examples: int = 16  # each compared stage again alone in a fresh process, on this many examples

    def __post_init__(self):
        if self.size not in SIZES:
            raise BenchmarkError(f"unknown size {self.size!r}; expected one of {', '.join(SIZES)}")
        for name in ("n_examples", "rounds"):
            if getattr(self, name) < 1:
                raise BenchmarkError(f"{name} must be at least 1, got {getattr(self, name)}")


def size_model(cfg: SizeConfig) -> HFCausalLMAdapter:
    """A randomly initialised bias-free Llama of the configured shape (float32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(**SIZES[cfg.size], max_position_embeddings=2 * cfg.seq_len, attention_bias=False,
                         mlp_bias=False, tie_word_embeddings=False)
    return HFCausalLMAdapter(LlamaForCausalLM(config).eval(), SimpleNamespace(pad_token_id=0))


def random_examples(n: int, cfg: SizeConfig, prefix: str, seed: int) -> list[TokenizedExample]:
    """``n`` random token sequences of ``seq_len`` tokens, the second half being the response."""
    return random_token_examples(n, SIZES[cfg.size]["vocab_size"], cfg.seq_len, prefix, seed)


def random_token_examples(n: int, vocab_size: int, seq_len: int, prefix: str, seed: int) -> list[TokenizedExample]:
    """``n`` sequences of ``seq_len`` tokens drawn uniformly from ``1 .. vocab_size - 1`` (0 is the padding), the second
    half being the response; ids ``prefix:1`` .. ``prefix:n``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (n, seq_len), generator=gen)
    return [TokenizedExample(f"{prefix}:{i + 1}", tuple(row.tolist()), seq_len // 2) for i, row in enumerate(ids)]


def random_concept(adapter: ModelAdapter, cfg: SizeConfig, k: int, evals: Sequence[TokenizedExample]) -> ConceptFunction:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    hook = f"blocks.{cfg.concept_layer}.hook_resid_post"
    directions = [ConceptDirection(torch.randn(adapter.d_model, generator=gen), hook, kind="custom",
                                   metadata={"name": f"concept_{j}"}) for j in range(k)]
    return ConceptFunction.from_directions(directions, eval_examples=evals)


def size_stages(cfg: SizeConfig, adapter: HFCausalLMAdapter, evals: list, work: Path, state: dict) -> dict[str, Callable]:
    """Each stage as ``examples -> value`` (run on all examples for the time, on one batch for the FLOP count);
    ``state`` receives the fitted curvature and the seconds each query took to compute."""
    bs = cfg.batch_size
    one, many = random_concept(adapter, cfg, 1, evals), random_concept(adapter, cfg, cfg.many_concepts, evals)

    def fit(examples):
        state["curvature"] = fit_curvature(adapter, examples, maps=cfg.concept_layer, strategy="ekfac", fisher="true",
                                           batch_size=bs, damping=None, damping_factor=DAMPING_FACTOR, seed=cfg.seed,
                                           progress=False)

    def score(concept, rank):
        estimators = {}

        def run(examples):  # the first call computes the preconditioned queries, timed apart
            if "estimator" not in estimators:
                estimators["estimator"] = ConceptInfluence(concept, state["curvature"],
                                                           scoring=ScoringSettings(batch_size=bs, query_rank=rank))
                start = time.perf_counter()
                estimators["estimator"].score(adapter, examples[:1], progress=False)
                state[f"query_seconds_{concept.k}_{rank}"] = time.perf_counter() - start
            return estimators["estimator"].score(adapter, examples, progress=False)
        return run

    def train_step(examples):
        if "clone" not in state:  # copied once, on the FLOP-count call before the timed one
            state["clone"] = copy.copy(adapter)
            state["clone"].model = copy.deepcopy(adapter.model)
        train_model(state["clone"], examples, 1, 1e-4, bs, tokens="response", seed=cfg.seed, progress=False)

    def kronfluence(concept):
        def run(examples):
            result = kronfluence_concept_scores(adapter, examples, concept, work / "kronfluence", bs, cfg.seed,
                                                ("aggregated",))
            return {**result, "score_seconds": result["score_seconds"]["aggregated"],
                    "scores": result["scores"]["aggregated"]}
        return run

    def bergson(concept):
        return lambda examples: bergson_concept_scores(adapter, examples, concept, work / "bergson", bs, cfg.seed,
                                                       DAMPING_FACTOR)

    stages = {
        "floor": lambda examples: floor(adapter, examples, bs),
        "train_step": train_step,
        "ekfac_fit": fit,
        "concept_influence_k1": score(one, None),
        f"concept_influence_k{cfg.many_concepts}": score(many, None),
        "concept_influence_k1_lowrank": score(one, cfg.query_rank),
        f"concept_influence_k{cfg.many_concepts}_lowrank": score(many, cfg.query_rank),
        "probe_projection": lambda examples: ProbeProjection(one).score(adapter, examples, batch_size=bs, progress=False),
    }
    runners = dict(zip(COMPARED_LIBRARIES, (kronfluence, bergson)))
    for concept in (one, many):
        for library in libraries(cfg):
            stages[f"{library}_k{concept.k}"] = runners[library](concept)
    return {name: stages[name] for name in selected(cfg, stages)}


#: The libraries the size benchmark compares with ours.
COMPARED_LIBRARIES = ("kronfluence", "bergson")


def libraries(cfg: SizeConfig) -> list[str]:
    """The libraries compared with ours: none unless asked for, Bergson only when it is installed."""
    if not cfg.kronfluence:
        return []
    return ["kronfluence"] + (["bergson"] if bergson_unavailable() is None else [])


def compared(cfg: SizeConfig) -> list[tuple[str, ...]]:
    """Each compared K = 1 pipeline, as its stages: our fit and scoring, then each library's."""
    return [("ekfac_fit", "concept_influence_k1")] + [(f"{library}_k1",) for library in libraries(cfg)]


def selected(cfg: SizeConfig, names: Sequence[str]) -> list[str]:
    """Those of ``names`` that ``cfg.stages`` asks for (all when empty), and always the floor and the fit: every ratio
    is to the floor, and scoring needs the fit."""
    return [name for name in names if not cfg.stages or name in cfg.stages or name in ("floor", "ekfac_fit")]


def memory_child(config: str, stage: str) -> None:
    """Child process: build the model and data of ``config`` (a SizeConfig as JSON), prepare what ``stage`` needs
    (the fit before scoring, the libraries' imports), reset the peak RSS, run the stage on the first
    ``memory_examples`` examples and print its peak RSS and the rise over the RSS before it (MiB, one JSON line)."""
    cfg = SizeConfig(**{**json.loads(config), "stages": ()})
    torch.set_num_threads(cfg.threads)
    adapter = size_model(cfg)
    train = random_examples(cfg.n_examples, cfg, "train", cfg.seed)[: cfg.memory_examples]
    evals = random_examples(cfg.n_eval, cfg, "eval", cfg.seed + 1)
    if stage == "kronfluence_k1":
        import kronfluence.analyzer  # noqa: F401  (its imports are not the stage's memory)
    with tempfile.TemporaryDirectory(prefix="concept-influence-size-memory-") as work:
        stages = size_stages(cfg, adapter, evals, Path(work), {})
        if stage.startswith("concept_influence"):
            stages["ekfac_fit"](train)
        _, memory = measure_peak(lambda: stages[stage](train))
    print(json.dumps({"peak_mib": memory.get("peak_mib"), "rise_mib": memory.get("rise_mib")}))


