"""Speed benchmark: cost per example of each path, factor fitting, peak memory, and kronfluence.

Everything is measured in one run on models trained briefly on the embedded demo corpus.

* Part A (a TransformerLens model from the small-model kit): one epoch of plain training steps
  (forward + backward + AdamW, response loss), Concept Influence scoring (the streaming engine with the
  EK-FAC-preconditioned query; the curvature is fitted beforehand, the query gradient is included),
  probe projection, and EK-FAC fitting — all over the same examples with the same batch size. The
  stages are interleaved: every round runs each stage once, the order rotating between rounds, and the
  table reports medians, so that load from other processes hits every stage alike. torch runs on one
  thread (``SpeedConfig.threads``): on a small shared CPU more threads make small models slower and noisier.
* Part B (a bias-free Llama-style Hugging Face model, since kronfluence 1.0.1 tracks only ``nn.Linear``
  and ``nn.Conv2d``, not GPT-2's ``Conv1D``, and tracks biases, which we do not): our EK-FAC fit + scoring
  against kronfluence's on the same model, concept measurement, training loss, sampled Fisher labels,
  tracked modules and damping (0.1 × mean eigenvalue per map in both); kronfluence scores with the query
  gradients aggregated into ∇f and in its default pairwise mode (one query per evaluation example).
  Spearman correlation of the score vectors (kronfluence's sign flipped: its pairwise score is
  ``+∇fᵀ(G+λI)⁻¹∇L``) and time ratios, interleaved over rounds too.
* Peak memory: each stage runs again in its own subprocess on the first ``memory_examples`` examples,
  after loading model and data; the peak resident set size is reset just before the stage (Linux
  ``/proc/self/clear_refs``) and read after it (``VmHWM``): the stage's peak RSS and its rise over the RSS
  before it. (``ru_maxrss`` cannot separate stages: it keeps the peak of loading, and a child started by
  ``vfork`` inherits its parent's; tracemalloc does not see tensor memory.)
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch

from probes import ConceptDirection, collect_activations, train_logistic_probe

from ..concepts import ConceptFunction
from ..curvature import Curvature, fit_curvature
from ..gradients import sample_labels
from ..data import Batch, TokenizedExample, collate, tokenize_examples
from ..demo_corpus import make_demo_corpus
from ..estimators import ConceptInfluence, ProbeProjection
from ..fileio import atomic_write_text, load_tensors, save_tensors
from ..models import HFCausalLMAdapter, ModelAdapter, per_token_mean_loss
from ..provenance import machine_description
from ..smallmodel import build_small_model, load_tokenizer, train_bpe_tokenizer, train_model

__all__ = ["SpeedConfig", "run_speed_benchmark", "kronfluence_concept_scores", "machine_description", "format_markdown"]

# kronfluence's heuristic damping (``ScoreArguments(damping_factor=None)``): 0.1 × mean(Λ) per module.
DAMPING_FACTOR = 0.1
STAGES_A = ("train_step", "concept_influence", "probe_projection", "ekfac_fit")
KRONFLUENCE_MODES = ("aggregated", "per_query")
STAGES_B = ("ours", "kronfluence_aggregated", "kronfluence_per_query")
LABELS_B = {"kronfluence_aggregated": "kronfluence, ∇f aggregated", "kronfluence_per_query": "kronfluence, per query"}
KRONFLUENCE_SETTINGS = {
    "FactorArguments": "strategy='ekfac', use_empirical_fisher=False (labels sampled as ours), amp_dtype=None, "
                       "covariance, lambda and per-sample-gradient dtype float32, eigendecomposition float64",
    "ScoreArguments": "damping_factor=None (0.1 × mean Λ per module), query_gradient_low_rank=None, amp_dtype=None, "
                      "float32; aggregated: aggregate_query_gradients=True; per query: aggregate_query_gradients=False, "
                      "query_gradient_accumulation_steps = all query batches",
    "Analyzer": "cpu=True; per_device_batch_size = per_device_query_batch_size = per_device_train_batch_size = "
                "the batch size above",
}
LABELS_A = {
    "train_step": "training step (fwd + bwd + AdamW)",
    "concept_influence": "concept_influence scoring (EK-FAC query)",
    "probe_projection": "probe_projection (forward to the concept's block)",
    "ekfac_fit": "EK-FAC fit (covariances + eigenvalue correction)",
}


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
class _Data:
    tokenizer: object
    train: list[TokenizedExample]
    probe_positive: list[TokenizedExample]
    probe_negative: list[TokenizedExample]
    evals: list[TokenizedExample]


# ---- data and models ---------------------------------------------------------------------------------


def _prepare_data(cfg: SpeedConfig, work: Path, train_tokenizer: bool) -> _Data:
    corpus = make_demo_corpus(cfg.n_train, 0.1, cfg.n_probe, cfg.n_eval, cfg.seed)
    if train_tokenizer:
        texts = [f"{c.prompt}\n{c.response}" for c in corpus.train + corpus.probe_positive + corpus.probe_negative]
        tokenizer = train_bpe_tokenizer(texts, work / "tokenizer", cfg.vocab_size)
    else:
        tokenizer = load_tokenizer(work / "tokenizer")
    tok = partial(tokenize_examples, tokenizer=tokenizer, max_length=cfg.max_length)
    return _Data(tokenizer, tok(corpus.train), tok(corpus.probe_positive), tok(corpus.probe_negative),
                 tok(corpus.eval_prompts))


def _tl_adapter(cfg: SpeedConfig, tokenizer) -> ModelAdapter:
    return build_small_model(tokenizer, cfg.n_layers, cfg.d_model, cfg.n_heads, n_ctx=cfg.max_length, seed=cfg.seed)


def _llama_adapter(cfg: SpeedConfig, tokenizer) -> HFCausalLMAdapter:
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


def _trained(adapter: ModelAdapter, cfg: SpeedConfig, data: _Data) -> ModelAdapter:
    train_model(adapter, data.train, cfg.epochs, cfg.lr, cfg.batch_size, tokens="all", seed=cfg.seed, progress=False)
    return adapter


def _concept(adapter: ModelAdapter, cfg: SpeedConfig, data: _Data, direction_path: Path) -> tuple[ConceptFunction, dict]:
    """A logistic probe for the demo trait at the concept hook (saved to ``direction_path``) as a concept."""
    acts = [collect_activations(adapter, ex, cfg.hook_name, progress=False) for ex in (data.probe_positive, data.probe_negative)]
    probe = train_logistic_probe(acts[0], acts[1], cfg.hook_name, seed=cfg.seed)
    probe.direction.save(direction_path)
    return ConceptFunction.from_directions(probe.direction, eval_examples=data.evals), probe.metrics


def _n_tokens(examples: Sequence[TokenizedExample]) -> int:
    return sum(len(e.input_ids) for e in examples)


# ---- timing --------------------------------------------------------------------------------------------


def _seconds(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _train_epoch_seconds(adapter: ModelAdapter, examples: Sequence[TokenizedExample], cfg: SpeedConfig) -> float:
    """One epoch of training steps on a copy of the model (the copy is made before the clock starts)."""
    clone = copy.copy(adapter)
    clone.model = copy.deepcopy(adapter.model)
    return _seconds(lambda: train_model(clone, examples, 1, cfg.lr, cfg.batch_size, tokens="response", seed=cfg.seed,
                                        progress=False))


def _interleaved(stages: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each stage once per round, rotating the order between rounds; each stage returns its seconds."""
    names = list(stages)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(stages[name]())
    return times


def _part_a(cfg: SpeedConfig, data: _Data, work: Path) -> dict:
    adapter = _trained(_tl_adapter(cfg, data.tokenizer), cfg, data)
    concept, probe_metrics = _concept(adapter, cfg, data, work / "direction_tl.safetensors")
    maps = adapter.linear_maps(cfg.concept_layer)
    bs, train = cfg.batch_size, data.train
    fit = partial(fit_curvature, adapter, train, maps=maps, strategy="ekfac", batch_size=bs, seed=cfg.seed, progress=False)
    curvature = fit()
    curvature.save(work / "curvature_tl")
    save_tensors(work / "model_tl.safetensors", adapter.model.state_dict())

    stages = {
        "train_step": lambda: _train_epoch_seconds(adapter, train, cfg),
        "concept_influence": lambda: _seconds(
            lambda: ConceptInfluence(concept, curvature).score(adapter, train, batch_size=bs, progress=False)),
        "probe_projection": lambda: _seconds(lambda: ProbeProjection(concept).score(adapter, train, batch_size=bs, progress=False)),
        "ekfac_fit": lambda: _seconds(fit),
        "query_gradient": lambda: _seconds(lambda: curvature.precondition(concept.gradient(adapter, maps, batch_size=bs))),
    }
    times = _interleaved(stages, cfg.rounds)
    n, n_tokens = len(train), _n_tokens(train)
    result = {
        "model": f"HookedTransformer: {cfg.n_layers} blocks, d_model {cfg.d_model}, {cfg.n_heads} heads, "
                 f"vocab {len(data.tokenizer)}",
        "hook_name": cfg.hook_name,
        "tracked_maps": len(maps),
        "probe_accuracy": probe_metrics["accuracy"],
        "n_examples": n,
        "n_tokens": n_tokens,
        "n_eval_examples": len(data.evals),
        "batch_size": bs,
        "rounds": cfg.rounds,
        "stages": {},
    }
    for name in STAGES_A:
        seconds = statistics.median(times[name])
        result["stages"][name] = {"seconds": seconds, "all_seconds": times[name], "seconds_per_1k_examples": 1000 * seconds / n,
                                  "tokens_per_second": n_tokens / seconds}
    result["query_gradient_seconds"] = statistics.median(times["query_gradient"])
    result["query_gradient_all_seconds"] = times["query_gradient"]
    s = {name: result["stages"][name]["seconds"] for name in STAGES_A}
    result["ratios"] = {
        "scoring_over_train_step": s["concept_influence"] / s["train_step"],
        "probe_projection_speedup": s["concept_influence"] / s["probe_projection"],
        "ekfac_fit_over_train_epoch": s["ekfac_fit"] / s["train_step"],
        "end_to_end_over_probe_projection": (s["ekfac_fit"] + s["concept_influence"]) / s["probe_projection"],
    }
    return result


# ---- kronfluence -----------------------------------------------------------------------------------------


def _kronfluence_batch(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict:
    # A dict whose first value is a tensor: kronfluence (accelerate) reads the batch size from it.
    b = collate(examples, pad_token_id)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "response_mask": b.response_mask,
            "lengths": b.lengths, "ids": b.ids}


def _kronfluence_task(twin: HFCausalLMAdapter, concept: ConceptFunction, module_names: list[str], seed: int):
    """kronfluence's ``Task`` for our concept measurement and training loss (``twin`` wraps the model
    kronfluence is given)."""
    from kronfluence.task import Task

    n_eval = len(concept.eval_examples)

    class ConceptTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            # Σ_z mean response-token cross-entropy; for the true Fisher (sample=True) the labels are drawn
            # exactly as our fit_curvature draws them (seeded per example id).
            b = Batch(**batch)
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
            targets = sample_labels(logits.detach(), b, seed) if sample else None
            return per_token_mean_loss(logits, b, targets=targets).sum()

        def compute_measurement(self, batch, model):
            # f = mean over eval examples of the concept's readout, exactly as ConceptFunction measures it
            if model is not twin.model:
                raise RuntimeError("kronfluence measured another model than the one the task wraps")
            return concept.per_example(twin, Batch(**batch))[:, 0].sum() / n_eval

        def get_influence_tracked_modules(self):
            return module_names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return ConceptTask()


def kronfluence_concept_scores(adapter: HFCausalLMAdapter, examples: Sequence[TokenizedExample], concept: ConceptFunction,
                               output_dir: str | Path, batch_size: int = 16, seed: int = 0,
                               query_modes: Sequence[str] = ("aggregated",)) -> dict:
    """Concept Influence of ``examples`` computed by kronfluence 1.0.1 on a copy of the adapter's model:
    EK-FAC with the true Fisher (labels sampled as ours), CPU, float32, heuristic damping 0.1 × mean(Λ)
    per module, the same linear maps as ours (blocks up to the concept's layer).

    ``query_modes``: ``"aggregated"`` sums the evaluation examples' measurement gradients into ∇f before
    preconditioning (``aggregate_query_gradients=True``); ``"per_query"`` is kronfluence's pairwise default,
    one preconditioned gradient per evaluation example and query × train scores (summed over queries
    here), with every query accumulated before the one pass over the training data.

    Returns ``scores`` and ``score_seconds`` per mode (scores sign-aligned with ours: −kronfluence's
    pairwise score), ``fit_seconds``, the per-map ``dampings`` (by our map names) and ``tracked_modules``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.constants import HEURISTIC_DAMPING_SCALE, LAMBDA_MATRIX_NAME, NUM_LAMBDA_PROCESSED
    from kronfluence.utils.dataset import DataLoaderKwargs

    if concept.k != 1:
        raise ValueError(f"the kronfluence comparison measures one concept, got {concept.k}")
    bad = [mode for mode in query_modes if mode not in KRONFLUENCE_MODES]
    if bad:
        raise ValueError(f"query_modes must be among {KRONFLUENCE_MODES}, got {bad[0]!r}")
    model = copy.deepcopy(adapter.model)
    twin = HFCausalLMAdapter(model, adapter.tokenizer)
    our_name = {id(m.input_module): m.name for m in twin.linear_maps(concept.layer)}
    kron_to_ours = {name: our_name[id(mod)] for name, mod in model.named_modules() if id(mod) in our_name}
    task = _kronfluence_task(twin, concept, list(kron_to_ours), seed)
    model = prepare_model(model, task)
    examples, queries = list(examples), list(concept.eval_examples)
    result = {"scores": {}, "score_seconds": {}, "tracked_modules": list(kron_to_ours)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp.GradScaler inside kronfluence
        analyzer = Analyzer("concept", model, task, cpu=True, log_level=logging.WARNING, disable_tqdm=True,
                            output_dir=str(output_dir))
        loader = DataLoaderKwargs(collate_fn=partial(_kronfluence_batch, pad_token_id=adapter.pad_token_id))
        factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=False, amp_dtype=None,
                                      activation_covariance_dtype=torch.float32, gradient_covariance_dtype=torch.float32,
                                      eigendecomposition_dtype=torch.float64, per_sample_gradient_dtype=torch.float32,
                                      lambda_dtype=torch.float32)
        start = time.perf_counter()
        analyzer.fit_all_factors("ekfac", examples, per_device_batch_size=batch_size, dataloader_kwargs=loader,
                                 factor_args=factor_args, overwrite_output_dir=True)
        result["fit_seconds"] = time.perf_counter() - start
        for mode in query_modes:
            per_query = mode == "per_query"
            score_args = ScoreArguments(damping_factor=None, amp_dtype=None, aggregate_query_gradients=not per_query,
                                        query_gradient_accumulation_steps=-(-len(queries) // batch_size) if per_query else 1,
                                        query_gradient_low_rank=None, per_sample_gradient_dtype=torch.float32,
                                        precondition_dtype=torch.float32, score_dtype=torch.float32)
            start = time.perf_counter()
            analyzer.compute_pairwise_scores(mode, "ekfac", queries, examples, per_device_query_batch_size=batch_size,
                                             per_device_train_batch_size=batch_size, dataloader_kwargs=loader,
                                             score_args=score_args, overwrite_output_dir=True)
            pairwise = analyzer.load_pairwise_scores(mode)["all_modules"]  # [queries (1 when aggregated), N]
            result["score_seconds"][mode] = time.perf_counter() - start
            result["scores"][mode] = -pairwise.double().sum(0).numpy()
        lambdas = analyzer.load_lambda_matrices("ekfac")
    result["dampings"] = {kron_to_ours[name]: HEURISTIC_DAMPING_SCALE * float((lam / lambdas[NUM_LAMBDA_PROCESSED][name]).mean())
                          for name, lam in lambdas[LAMBDA_MATRIX_NAME].items()}
    return result


def _ours_fit_and_score(adapter: ModelAdapter, examples: Sequence[TokenizedExample], concept: ConceptFunction,
                        batch_size: int, seed: int) -> dict:
    start = time.perf_counter()
    curvature = fit_curvature(adapter, examples, maps=concept.layer, strategy="ekfac", fisher="true", batch_size=batch_size,
                              damping=None, damping_factor=DAMPING_FACTOR, seed=seed, progress=False)
    fitted = time.perf_counter()
    scores = ConceptInfluence(concept, curvature).score(adapter, examples, batch_size=batch_size, progress=False)
    scored = time.perf_counter()
    return {"scores": scores.column(0), "fit_seconds": fitted - start, "score_seconds": scored - fitted,
            "dampings": curvature.dampings}


def _part_b(cfg: SpeedConfig, data: _Data, work: Path) -> dict:
    try:
        import kronfluence  # noqa: F401
    except ImportError as e:
        return {"error": f"kronfluence is not importable ({e}); install it with `make install`"}
    from scipy.stats import pearsonr, spearmanr

    adapter = _trained(_llama_adapter(cfg, data.tokenizer), cfg, data)
    concept, probe_metrics = _concept(adapter, cfg, data, work / "direction_hf.safetensors")
    save_tensors(work / "model_hf.safetensors", adapter.model.state_dict())
    train, bs = data.train[: cfg.kron_n_train], cfg.batch_size
    pipelines = {
        "ours": lambda: _ours_fit_and_score(adapter, train, concept, bs, cfg.seed),
        "kronfluence": lambda: kronfluence_concept_scores(adapter, train, concept, work / "kronfluence", bs, cfg.seed,
                                                          KRONFLUENCE_MODES),
    }
    runs: dict[str, list[dict]] = {name: [] for name in pipelines}
    for r in range(cfg.kron_rounds):
        for name in (list(pipelines) if r % 2 == 0 else list(pipelines)[::-1]):
            gc.collect()
            runs[name].append(pipelines[name]())
    ours, kron = runs["ours"], runs["kronfluence"]
    timings = {"ours": ([run["fit_seconds"] for run in ours], [run["score_seconds"] for run in ours])}
    for mode in KRONFLUENCE_MODES:
        timings[f"kronfluence_{mode}"] = ([run["fit_seconds"] for run in kron], [run["score_seconds"][mode] for run in kron])
    result = {
        "model": f"LlamaForCausalLM (no biases): {cfg.n_layers} blocks, d_model {cfg.d_model}, {cfg.n_heads} heads, "
                 f"d_mlp {4 * cfg.d_model}, vocab {len(data.tokenizer)}",
        "hook_name": cfg.hook_name,
        "probe_accuracy": probe_metrics["accuracy"],
        "tracked_modules": kron[-1]["tracked_modules"],
        "n_examples": len(train),
        "n_tokens": _n_tokens(train),
        "n_eval_examples": len(data.evals),
        "batch_size": bs,
        "rounds": cfg.kron_rounds,
        "kronfluence_settings": KRONFLUENCE_SETTINGS,
        "damping_max_relative_difference": max(abs(ours[-1]["dampings"][k] - v) / v for k, v in kron[-1]["dampings"].items()),
        "pipelines": {},
    }
    for name, (fits, scores) in timings.items():
        totals = [f + s for f, s in zip(fits, scores)]
        entry = {"fit_seconds": statistics.median(fits), "score_seconds": statistics.median(scores),
                 "total_seconds": statistics.median(totals), "all_fit_seconds": fits, "all_score_seconds": scores}
        result["pipelines"][name] = entry
        if name != "ours":
            values = kron[-1]["scores"][name.removeprefix("kronfluence_")]
            base = result["pipelines"]["ours"]
            entry.update(spearman=float(spearmanr(ours[-1]["scores"], values).statistic),
                         pearson=float(pearsonr(ours[-1]["scores"], values).statistic),
                         slowdown_fit=entry["fit_seconds"] / base["fit_seconds"],
                         slowdown_scoring=entry["score_seconds"] / base["score_seconds"],
                         slowdown_total=entry["total_seconds"] / base["total_seconds"])
    return result


# ---- peak memory (one subprocess per stage) ----------------------------------------------------------------


def _rss_kib(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) resident set size of this process, in KiB (Linux)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(f"{field}:"))


def _memory_stage(stage: str, work: Path) -> None:
    """Child process: load model and data from ``work``, reset the peak RSS, run ``stage`` on the first
    ``memory_examples`` examples and print the stage's peak RSS and its rise over the RSS before it (MiB)."""
    cfg = SpeedConfig(**json.loads((work / "config.json").read_text()))
    torch.set_num_threads(cfg.threads)
    data = _prepare_data(cfg, work, train_tokenizer=False)
    bs = cfg.batch_size
    if stage in STAGES_A:
        adapter, suffix, examples = _tl_adapter(cfg, data.tokenizer), "tl", data.train[: cfg.memory_examples]
    else:
        adapter, suffix, examples = _llama_adapter(cfg, data.tokenizer), "hf", data.train[: min(cfg.memory_examples, cfg.kron_n_train)]
    adapter.model.load_state_dict(load_tensors(work / f"model_{suffix}.safetensors"))
    concept = ConceptFunction.from_directions(ConceptDirection.load(work / f"direction_{suffix}.safetensors"),
                                              eval_examples=data.evals)
    runs = {
        "train_step": lambda: train_model(adapter, examples, 1, cfg.lr, bs, tokens="response", seed=cfg.seed, progress=False),
        "ekfac_fit": lambda: fit_curvature(adapter, examples, maps=cfg.concept_layer, batch_size=bs, seed=cfg.seed, progress=False),
        "concept_influence": lambda: ConceptInfluence(concept, Curvature.load(work / "curvature_tl", adapter)).score(
            adapter, examples, batch_size=bs, progress=False),
        "probe_projection": lambda: ProbeProjection(concept).score(adapter, examples, batch_size=bs, progress=False),
        "ours": lambda: _ours_fit_and_score(adapter, examples, concept, bs, cfg.seed),
        **{f"kronfluence_{mode}": partial(kronfluence_concept_scores, adapter, examples, concept, work / "kronfluence_memory",
                                          bs, cfg.seed, (mode,)) for mode in KRONFLUENCE_MODES},
    }
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak RSS (VmHWM) to the current RSS
        fh.write("5")
    before = _rss_kib("VmRSS")
    runs[stage]()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"peak_mib": peak / 1024, "increase_mib": (peak - before) / 1024}))


def _peak_memory(stage: str, work: Path) -> dict:
    code = f"from concept_influence.benchmarks.speed import _memory_stage; _memory_stage({stage!r}, __import__('pathlib').Path({str(work)!r}))"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the peak-memory subprocess for stage {stage!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- report -------------------------------------------------------------------------------------------------


def _command(out_dir: Path, quick: bool, seed: int, kronfluence: bool) -> str:
    parts = ["concept-influence bench speed --out", str(out_dir)]
    parts += ["--quick"] if quick else []
    parts += [] if kronfluence else ["--no-kronfluence"]
    parts += [f"--seed {seed}"] if seed else []
    return " ".join(parts)


def _check(value: float, goal: str) -> str:
    op, target = goal.split()
    ok = value <= float(target) if op == "≤" else value >= float(target)
    return f"{goal}× {'met' if ok else 'missed'}"


def _mib(memory: dict | None, key: str) -> str:
    return "n/a (needs Linux /proc)" if memory is None else f"{memory[key]:.0f}"


def format_markdown(results: dict) -> str:
    """The results as a short markdown report (machine, part A table and ratios, part B comparison)."""
    m, a, b, mem = results["machine"], results["part_a"], results["part_b"], results["memory"]
    lines = [
        "# Speed benchmark", "",
        f"Reproduce: `{results['command']}` ({results['total_seconds']:.0f} s in all on this machine).", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch {m['torch']} with "
        f"{m['torch_threads']} threads, Python {m['python']}, transformers {m['transformers']}, "
        f"transformer-lens {m['transformer_lens']}, kronfluence {m['kronfluence'] or 'not installed'}; "
        f"load average {m['load_average_start'][0]:.2f} at the start, {results['load_average_end'][0]:.2f} at the end.", "",
        f"## A. Cost per example ({a['model']})", "",
        f"{a['n_examples']} training examples ({a['n_tokens']} tokens) of the demo corpus, batch size {a['batch_size']}; "
        f"concept: logistic probe at `{a['hook_name']}` (held-out accuracy {a['probe_accuracy']:.3f}), "
        f"{a['tracked_maps']} tracked weight matrices, {a['n_eval_examples']} evaluation examples. Median of "
        f"{a['rounds']} interleaved rounds. Peak memory: each stage again in its own process on "
        f"{results['config']['memory_examples']} examples, peak RSS during the stage (VmHWM reset before it) and "
        "its rise over the RSS before it.", "",
        "| stage | s / 1k examples | tokens / s | peak RSS (MiB) | rise (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in STAGES_A:
        st = a["stages"][name]
        lines.append(f"| {LABELS_A[name]} | {st['seconds_per_1k_examples']:.2f} | {st['tokens_per_second']:,.0f} | "
                     f"{_mib(mem[name], 'peak_mib')} | {_mib(mem[name], 'increase_mib')} |")
    r = a["ratios"]
    lines += [
        "", f"concept_influence scoring includes the query gradient ∇f over the evaluation examples and its "
            f"preconditioning: {a['query_gradient_seconds']:.2f} s once per run.", "",
        "| ratio | value | goal |", "| --- | ---: | --- |",
        f"| full scoring / training step (per example) | {r['scoring_over_train_step']:.2f}× | {_check(r['scoring_over_train_step'], '≤ 3')} |",
        f"| probe_projection speed-up over full scoring (per example) | {r['probe_projection_speedup']:.1f}× | "
        f"{_check(r['probe_projection_speedup'], '≥ 30')} |",
        f"| probe_projection speed-up over EK-FAC fit + full scoring | {r['end_to_end_over_probe_projection']:.1f}× | — |",
        f"| EK-FAC fit / one training epoch | {r['ekfac_fit_over_train_epoch']:.2f}× | — |", "",
        "## B. Against kronfluence", "",
    ]
    if "error" in b:
        lines.append(f"Not run: {b['error']}")
    else:
        p = b["pipelines"]
        names = ("ours",) + tuple(f"kronfluence_{mode}" for mode in KRONFLUENCE_MODES)

        def row(label: str, cell: Callable[[str], str]) -> str:
            return f"| {label} | " + " | ".join(cell(name) for name in names) + " |"

        def seconds(key: str, ratio: str) -> Callable[[str], str]:
            return lambda n: f"{p[n][key]:.2f}" + ("" if n == "ours" else f" ({p[n][ratio]:.2f}×)")

        lines += [
            f"{b['model']}, trained briefly on the demo corpus; {b['n_examples']} examples ({b['n_tokens']} tokens), "
            f"batch size {b['batch_size']}; concept: logistic probe at `{b['hook_name']}` (held-out accuracy "
            f"{b['probe_accuracy']:.3f}), {b['n_eval_examples']} evaluation examples. Both sides use the same measurement, "
            f"training loss, sampled Fisher labels and {len(b['tracked_modules'])} tracked `nn.Linear` modules (blocks ≤ "
            f"{results['config']['concept_layer']}), damping 0.1 × mean(Λ) per map (largest relative difference of the "
            f"per-map dampings: {b['damping_max_relative_difference']:.1e}). kronfluence is timed in two query modes "
            f"on one factor fit: ∇f aggregated before preconditioning, and its default pairwise mode, one query per "
            f"evaluation example (query × train scores, summed). Median of {b['rounds']} interleaved rounds; in "
            "brackets, kronfluence's time over ours.", "",
            "| | ours | " + " | ".join(LABELS_B[n] for n in names[1:]) + " |", "| --- | ---: | ---: | ---: |",
            row("EK-FAC fit (s)", seconds("fit_seconds", "slowdown_fit")),
            row("scoring incl. query gradient (s)", seconds("score_seconds", "slowdown_scoring")),
            row("total (s)", seconds("total_seconds", "slowdown_total")),
            row("peak RSS, fit + score (MiB)", lambda n: _mib(mem[n], "peak_mib")),
            row("rise over the RSS before (MiB)", lambda n: _mib(mem[n], "increase_mib")),
            row("Spearman with ours (goal ≥ 0.99)", lambda n: "—" if n == "ours" else f"{p[n]['spearman']:.4f}"),
            row("Pearson with ours", lambda n: "—" if n == "ours" else f"{p[n]['pearson']:.4f}"),
            "",
            "Sign: kronfluence's pairwise score is +∇fᵀ(G+λI)⁻¹∇L(z), ours −∇fᵀ(G+λI)⁻¹∇L(z); the table compares ours "
            "with −kronfluence. Goal, ours ≥ 5× faster (total / scoring): " + "; ".join(
                f"{LABELS_B[n]}: {_check(p[n]['slowdown_total'], '≥ 5')} / {_check(p[n]['slowdown_scoring'], '≥ 5')}"
                for n in names[1:]) + ".", "",
            "kronfluence settings: " + "; ".join(f"`{key}`: {val}" for key, val in KRONFLUENCE_SETTINGS.items()) + ".",
        ]
    return "\n".join(lines) + "\n"


def run_speed_benchmark(out_dir: str | Path, quick: bool = False, seed: int = 0, kronfluence: bool = True) -> dict:
    """Run the speed benchmark; write ``out_dir/speed.json`` and ``out_dir/speed.md``, print the table and
    return the results. ``quick`` uses :meth:`SpeedConfig.quick`; ``kronfluence=False`` skips part B.
    torch runs on ``SpeedConfig.threads`` threads (restored afterwards)."""
    cfg = SpeedConfig.quick(seed) if quick else SpeedConfig(seed=seed)
    out = Path(out_dir)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        results = {"command": _command(out, quick, seed, kronfluence), "config": asdict(cfg),
                   "machine": machine_description()}
        with tempfile.TemporaryDirectory(prefix="ci-speed-") as tmp:
            work = Path(tmp)
            data = _prepare_data(cfg, work, train_tokenizer=True)
            results["part_a"] = _part_a(cfg, data, work)
            results["part_b"] = _part_b(cfg, data, work) if kronfluence else {"error": "skipped (kronfluence=False)"}
            atomic_write_text(work / "config.json", json.dumps(asdict(cfg)))
            stages = STAGES_A + (STAGES_B if "error" not in results["part_b"] else ())
            linux = Path("/proc/self/clear_refs").exists()
            results["memory"] = {stage: _peak_memory(stage, work) if linux else None for stage in stages}
    finally:
        torch.set_num_threads(threads)
    results["load_average_end"] = list(os.getloadavg())
    results["total_seconds"] = time.perf_counter() - started
    report = format_markdown(results)
    atomic_write_text(out / "speed.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "speed.md", report)
    print(report)
    return results
