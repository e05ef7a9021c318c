"""The kronfluence comparison (speed benchmark part B): kronfluence's EK-FAC scores of our concept against ours,
and Bergson's (:mod:`.bergson_bridge`) when it is installed."""

from __future__ import annotations

import copy
import gc
import logging
import statistics
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import fit_curvature
from concept_influence.data import Batch, TokenizedExample, collate
from concept_influence.estimators import ConceptInfluence
from concept_influence.fileio import save_tensors
from concept_influence.gradients import sample_labels
from concept_influence.models import HFCausalLMAdapter, ModelAdapter, per_token_mean_loss

from .bergson_bridge import (
    BERGSON_DIFFERENCES,
    BERGSON_SETTINGS,
    BERGSON_VERSION,
    bergson_concept_scores,
    bergson_unavailable,
)
from .speed_setup import (
    SpeedConfig,
    SpeedData,
    count_tokens,
    llama_speed_adapter,
    map_names_by_module,
    speed_concept,
    trained_speed_model,
)

__all__ = ["KRONFLUENCE_MODES", "KRONFLUENCE_SETTINGS", "kronfluence_concept_scores", "run_part_b",
           "ours_fit_and_score"]

# kronfluence's heuristic damping (``ScoreArguments(damping_factor=None)``): 0.1 × mean(Λ) per module.
DAMPING_FACTOR = 0.1
KRONFLUENCE_MODES = ("aggregated", "per_query")
KRONFLUENCE_SETTINGS = {
    "FactorArguments": "strategy='ekfac', use_empirical_fisher=False (labels sampled as ours), amp_dtype=None, "
                       "covariance, lambda and per-sample-gradient dtype float32, eigendecomposition float64",
    "ScoreArguments": "damping_factor=None (0.1 × mean Λ per module), query_gradient_low_rank=None, amp_dtype=None, "
                      "float32; aggregated: aggregate_query_gradients=True; per query: aggregate_query_gradients=False, "
                      "query_gradient_accumulation_steps = all query batches",
    "Analyzer": "cpu=True; per_device_batch_size = per_device_query_batch_size = per_device_train_batch_size = "
                "the batch size above",
}


def _kronfluence_batch(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict:
    # A dict whose first value is a tensor: kronfluence (accelerate) reads the batch size from it.
    b = collate(examples, pad_token_id)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "response_mask": b.response_mask,
            "lengths": b.lengths, "ids": b.ids}


def _kronfluence_task(twin: HFCausalLMAdapter, concept: ConceptFunction, module_names: list[str], seed: int):
    """kronfluence's ``Task`` for our concept measurement and training loss (``twin`` wraps the model
    kronfluence is given); its ``column`` attribute picks which of the concept's K readouts is measured."""
    from kronfluence.task import Task

    n_eval = len(concept.eval_examples)

    class ConceptTask(Task):
        column = 0

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
            return concept.per_example(twin, Batch(**batch))[:, self.column].sum() / n_eval

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
    here), with every query accumulated before the one pass over the training data. A measurement is one
    scalar, so a concept with K readouts takes K scoring runs (one pass over the training data each) after
    the one fit.

    Returns ``scores`` ``[N, K]`` and ``score_seconds`` (all K runs) per mode (scores sign-aligned with ours:
    −kronfluence's pairwise score), ``fit_seconds``, the per-map ``dampings`` (by our map names) and
    ``tracked_modules``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.constants import HEURISTIC_DAMPING_SCALE, LAMBDA_MATRIX_NAME, NUM_LAMBDA_PROCESSED
    from kronfluence.utils.dataset import DataLoaderKwargs

    bad = [mode for mode in query_modes if mode not in KRONFLUENCE_MODES]
    if bad:
        raise ValueError(f"query_modes must be among {KRONFLUENCE_MODES}, got {bad[0]!r}")
    model = copy.deepcopy(adapter.model)
    twin = HFCausalLMAdapter(model, adapter.tokenizer)
    kron_to_ours = map_names_by_module(twin, concept.layer, model)
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
            columns, start = [], time.perf_counter()
            for column in range(concept.k):
                task.column = column
                analyzer.compute_pairwise_scores(mode, "ekfac", queries, examples, per_device_query_batch_size=batch_size,
                                                 per_device_train_batch_size=batch_size, dataloader_kwargs=loader,
                                                 score_args=score_args, overwrite_output_dir=True)
                pairwise = analyzer.load_pairwise_scores(mode)["all_modules"]  # [queries (1 when aggregated), N]
                columns.append(-pairwise.double().sum(0))
            result["score_seconds"][mode] = time.perf_counter() - start
            result["scores"][mode] = torch.stack(columns, dim=1).numpy()
        lambdas = analyzer.load_lambda_matrices("ekfac")
    result["dampings"] = {kron_to_ours[name]: HEURISTIC_DAMPING_SCALE * float((lam / lambdas[NUM_LAMBDA_PROCESSED][name]).mean())
                          for name, lam in lambdas[LAMBDA_MATRIX_NAME].items()}
    return result


def ours_fit_and_score(adapter: ModelAdapter, examples: Sequence[TokenizedExample], concept: ConceptFunction,
                        batch_size: int, seed: int) -> dict:
    start = time.perf_counter()
    curvature = fit_curvature(adapter, examples, maps=concept.layer, strategy="ekfac", fisher="true", batch_size=batch_size,
                              damping=None, damping_factor=DAMPING_FACTOR, seed=seed, progress=False)
    fitted = time.perf_counter()
    scores = ConceptInfluence(concept, curvature).score(adapter, examples, batch_size=batch_size, progress=False)
    scored = time.perf_counter()
    return {"scores": scores.column(0), "fit_seconds": fitted - start, "score_seconds": scored - fitted,
            "dampings": curvature.dampings}


def run_part_b(cfg: SpeedConfig, data: SpeedData, work: Path) -> dict:
    try:
        import kronfluence  # noqa: F401
    except ImportError as e:
        return {"error": f"kronfluence is not importable ({e}); install it with `make install`"}
    from scipy.stats import pearsonr, spearmanr

    adapter = trained_speed_model(llama_speed_adapter(cfg, data.tokenizer), cfg, data)
    concept, probe_metrics = speed_concept(adapter, cfg, data, work / "direction_hf.safetensors")
    save_tensors(work / "model_hf.safetensors", adapter.model.state_dict())
    train, bs = data.train[: cfg.kron_n_train], cfg.batch_size
    pipelines = {
        "ours": lambda: ours_fit_and_score(adapter, train, concept, bs, cfg.seed),
        "kronfluence": lambda: kronfluence_concept_scores(adapter, train, concept, work / "kronfluence", bs, cfg.seed,
                                                          KRONFLUENCE_MODES),
    }
    bergson_error = bergson_unavailable()
    if bergson_error is None:
        pipelines["bergson"] = lambda: bergson_concept_scores(adapter, train, concept, work / "bergson", bs, cfg.seed,
                                                              DAMPING_FACTOR)
    runs: dict[str, list[dict]] = {name: [] for name in pipelines}
    for r in range(cfg.kron_rounds):
        for name in (list(pipelines) if r % 2 == 0 else list(pipelines)[::-1]):
            gc.collect()
            runs[name].append(pipelines[name]())
    ours, kron = runs["ours"], runs["kronfluence"]
    timings = {"ours": ([run["fit_seconds"] for run in ours], [run["score_seconds"] for run in ours])}
    final_scores = {}
    for mode in KRONFLUENCE_MODES:
        timings[f"kronfluence_{mode}"] = ([run["fit_seconds"] for run in kron], [run["score_seconds"][mode] for run in kron])
        final_scores[f"kronfluence_{mode}"] = kron[-1]["scores"][mode][:, 0]
    if bergson_error is None:
        berg = runs["bergson"]
        timings["bergson"] = ([run["fit_seconds"] for run in berg], [run["score_seconds"] for run in berg])
        final_scores["bergson"] = berg[-1]["scores"][:, 0]
        bergson = {"version": BERGSON_VERSION, "settings": BERGSON_SETTINGS, "differences": BERGSON_DIFFERENCES,
                   "label_seconds": statistics.median(run["label_seconds"] for run in berg),
                   "damping_ratio_median": statistics.median(berg[-1]["dampings"][k] / v
                                                             for k, v in ours[-1]["dampings"].items())}
    else:
        bergson = {"error": bergson_error}
    result = {
        "model": f"LlamaForCausalLM (no biases): {cfg.n_layers} blocks, d_model {cfg.d_model}, {cfg.n_heads} heads, "
                 f"d_mlp {4 * cfg.d_model}, vocab {len(data.tokenizer)}",
        "hook_name": cfg.hook_name,
        "probe_accuracy": probe_metrics["accuracy"],
        "tracked_modules": kron[-1]["tracked_modules"],
        "n_examples": len(train),
        "n_tokens": count_tokens(train),
        "n_eval_examples": len(data.evals),
        "batch_size": bs,
        "rounds": cfg.kron_rounds,
        "kronfluence_settings": KRONFLUENCE_SETTINGS,
        "bergson": bergson,
        "damping_max_relative_difference": max(abs(ours[-1]["dampings"][k] - v) / v for k, v in kron[-1]["dampings"].items()),
        "pipelines": {},
    }
    for name, (fits, scores) in timings.items():
        totals = [f + s for f, s in zip(fits, scores)]
        entry = {"fit_seconds": statistics.median(fits), "score_seconds": statistics.median(scores),
                 "total_seconds": statistics.median(totals), "all_fit_seconds": fits, "all_score_seconds": scores}
        result["pipelines"][name] = entry
        if name != "ours":
            values = final_scores[name]
            base = result["pipelines"]["ours"]
            entry.update(spearman=float(spearmanr(ours[-1]["scores"], values).statistic),
                         pearson=float(pearsonr(ours[-1]["scores"], values).statistic),
                         slowdown_fit=entry["fit_seconds"] / base["fit_seconds"],
                         slowdown_scoring=entry["score_seconds"] / base["score_seconds"],
                         slowdown_total=entry["total_seconds"] / base["total_seconds"])
    return result
