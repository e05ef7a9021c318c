"""The GPU check (issue 27, item 5; ``make gpu-check``, ``concept-influence bench gpu-check``): Concept Influence at the
paper's scale, planned before it runs, with the plan's bytes beside what each stage took.

1. A Qwen2.5-7B-shape model (:mod:`.scale_model`: random weights in bfloat16, PEFT LoRA r = 16 on all 7 linear maps) is
   built on the ``meta`` device and planned there (:mod:`concept_influence.plan`, for the device's memory). A plan that
   does not fit stops the check before any work.
2. The model is given its weights on the device (stage ``load``); EK-FAC is fitted for the LoRA factors of the tracked
   blocks with :func:`~concept_influence.curvature.fit_partitioned`, one partition of maps at a time as the plan cuts
   them, each partition's factors moved to the host once fitted (stages ``covariance pass``, ``eigendecomposition``,
   ``eigenvalue pass``, timed through the fit's ``accumulate``); a random direction of the residual stream after the
   middle block is the concept, its gradient preconditioned (``query``); the examples are scored (``scoring``).
3. Per stage: the time, and the peak memory beside the plan's figure. On CUDA, ``torch.cuda.max_memory_allocated``,
   reset at the start of each stage (what the plan counts: tensors, not the allocator's cache or the CUDA context). On
   the CPU, the process's peak RSS, reset at the start of each stage through ``/proc/self/clear_refs`` (Linux), less
   the RSS just before the model was given its weights (interpreter, torch, the libraries): one process, no fresh
   process per stage.
4. At a reduced width (Qwen2.5-7B's structure at 1/32 width, 4 blocks), the same pipeline in float32 on the CPU and in
   the low precision on the device, from the same weights and data, with the empirical Fisher (the tolerances are for
   it: :mod:`.lowprecision`); relative error and Spearman of the Concept Influence scores against those tolerances.
   The same at 1/8 width is reported, not enforced (why: :data:`.scale_model.SCALE_SIZES`).
5. ``gpu-check.json`` and ``gpu-check.md``; the checks (the plan fits, every stage ran, the scores are finite, the peak
   within ``peak_tolerance`` of the plan's on CUDA, the low-precision comparison, the time budget) decide the exit
   status."""

from __future__ import annotations

import copy
import gc
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import CurvatureSettings, fit_partitioned
from concept_influence.engine import ScoringSettings
from concept_influence.estimators import ConceptInfluence
from concept_influence.models import MODEL_DTYPES, HFCausalLMAdapter, MapSelection
from concept_influence.plan import ModelShape, Plan, PlanSettings, format_bytes, plan_memory

from .lowprecision import INFLUENCE_TOLERANCE, MIN_SPEARMAN, relative_error, spearman
from .scale_model import ScaleConfig, lora_model_on_meta, materialise, qwen2_config, random_concept_at, scale_adapter
from .scale_report import check_result, write_report
from .speed_memory import peak_rss, reset_peak_rss
from .speed_size_stages import random_token_examples

__all__ = ["StageMeter", "make_plan", "fit_and_score", "compare_low_precision", "run_scale_check"]

#: The stage each pass of the fit is measured as.
_PASS_STAGES = {"covariance": "covariance pass", "eigenvalues": "eigenvalue pass"}


class StageMeter:
    """Time and peak memory of named stages on ``device`` (module docstring, 3.); a stage run several times (once per
    partition) adds its seconds and keeps its largest peak. ``log``: print a line as each run ends."""

    def __init__(self, device: torch.device, log: bool = False):
        self.cuda, self.device, self.log = device.type == "cuda", device, log
        self.baseline = None if self.cuda else reset_peak_rss()  # the process before the model (CPU)
        self.stages: dict[str, dict] = {}
        self.current: tuple[str, float] | None = None
        self.started = time.perf_counter()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def start(self, name: str) -> None:
        self.stop()
        self._sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()
        self.current = (name, time.perf_counter())

    def stop(self) -> None:
        if self.current is None:
            return
        self._sync()
        (name, start), self.current = self.current, None
        seconds = time.perf_counter() - start
        if self.cuda:
            peak = measured = torch.cuda.max_memory_allocated(self.device)
            extra = {"reserved_bytes": torch.cuda.max_memory_reserved(self.device)}
        else:
            peak = peak_rss() if self.baseline is not None else None
            measured, extra = (None if peak is None else peak - self.baseline), {}
        rec = self.stages.setdefault(name, {"stage": name, "seconds": 0.0, "runs": 0, "peak_bytes": None,
                                            "measured_bytes": None})
        rec["seconds"] += seconds
        rec["runs"] += 1
        for key, value in (("peak_bytes", peak), ("measured_bytes", measured), *extra.items()):
            if value is not None and (rec.get(key) is None or value > rec[key]):
                rec[key] = value
        if self.log:
            shown = "" if measured is None else f", peak {format_bytes(measured)}"
            print(f"[{time.perf_counter() - self.started:7.1f} s] {name}: {seconds:.1f} s{shown}", flush=True)

    @contextmanager
    def stage(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def accumulate(self, examples: Sequence):
        """The fit's ``accumulate``: each pass over ``examples`` measured as its stage, and the time between the
        covariance pass and the eigenvalue pass (the eigendecomposition) as ``eigendecomposition``."""

        def run(pass_name, collect):
            self.start(_PASS_STAGES.get(pass_name, pass_name))
            stats = collect(examples)
            self.stop()
            if pass_name == "covariance":
                self.start("eigendecomposition")
            return stats

        return run


def make_plan(adapter: HFCausalLMAdapter, layer: int, device_memory: int | None, batch_size: int, seq_len: int,
              examples: int, name: str) -> Plan:
    """The memory plan of Concept Influence for a concept at block ``layer`` (the maps the adapter tracks up to it)."""
    shape = ModelShape.from_adapter(adapter, adapter.linear_maps(max_block=layer), name)
    return plan_memory(shape, PlanSettings(device_memory=device_memory, batch_size=batch_size, max_length=seq_len,
                                           examples=examples))


def fit_and_score(adapter: HFCausalLMAdapter, concept: ConceptFunction, plan: Plan, examples, fit_examples,
                  settings: CurvatureSettings, meter: StageMeter, offload: str | None,
                  directory: str | Path | None = None) -> np.ndarray:
    """EK-FAC fitted in the plan's partitions, the concept's query preconditioned, ``examples`` scored: the Concept
    Influence scores, each stage measured by ``meter``. ``offload`` or ``directory``: where each partition's factors
    go once fitted (:func:`~concept_influence.curvature.fit_partitioned`; a directory on the CPU, where the host is
    the device)."""
    concept.check(adapter)
    maps = adapter.linear_maps(max_block=concept.layer)
    curvature = fit_partitioned(adapter, [], maps, plan, settings, offload=offload, directory=directory,
                                progress=False, accumulate=meter.accumulate(fit_examples))
    meter.stop()  # (an eigendecomposition still open: a strategy without an eigenvalue pass)
    bs = settings.batch_size
    estimator = ConceptInfluence(concept, curvature, scoring=ScoringSettings(batch_size=bs))
    with meter.stage("query"):
        estimator.preconditioned_queries(adapter, curvature, maps, bs, False)
    with meter.stage("scoring"):
        return estimator.score(adapter, examples, batch_size=bs, progress=False).column(0)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare_low_precision(cfg: ScaleConfig, device: torch.device, keys: dict, n_examples: int, seq_len: int) -> dict:
    """A reduced-width model (Qwen2 config ``keys``) in float32 on the CPU and in ``cfg.dtype`` on ``device``, the same
    weights (drawn once in float32 on the CPU), data and seeds, through :func:`fit_and_score` with the empirical Fisher
    on ``n_examples`` of ``seq_len`` tokens: relative error and Spearman of the low-precision scores against the float32
    ones, and whether they are within the tolerances of :mod:`.lowprecision`."""
    bs, config, layer = cfg.batch_size, qwen2_config(keys, seq_len), keys["num_hidden_layers"] // 2
    train = random_token_examples(n_examples, keys["vocab_size"], seq_len, "compare", cfg.seed)
    evals = random_token_examples(cfg.n_eval, keys["vocab_size"], seq_len, "compare-eval", cfg.seed + 1)
    reference = materialise(lora_model_on_meta(config, cfg.lora_rank, torch.float32), "cpu", cfg.seed)
    low = copy.deepcopy(reference).to(MODEL_DTYPES[cfg.dtype]).to(device)
    settings = CurvatureSettings(fisher="empirical", batch_size=bs, seed=cfg.seed)
    scores, seconds = {}, {}
    for key, model in (("float32", reference), (cfg.dtype, low)):
        adapter = scale_adapter(model, MapSelection(blocks=f"0-{layer}"))
        plan = make_plan(adapter, layer, None, bs, seq_len, len(train), "compare")
        meter = StageMeter(adapter.device)
        scores[key] = fit_and_score(adapter, random_concept_at(adapter, layer, evals, cfg.seed + 2), plan, train, train,
                                    settings, meter, None)
        seconds[key] = sum(s["seconds"] for s in meter.stages.values())
    got, ref = scores[cfg.dtype], scores["float32"]
    measured = {"relative_error": relative_error(got, ref), "spearman": spearman(got, ref)}
    return {**measured, "compared": f"{cfg.dtype} on {device.type} vs float32 on cpu", "examples": len(train),
            "seq_len": seq_len, "d_model": keys["hidden_size"], "d_mlp": keys["intermediate_size"],
            "blocks": keys["num_hidden_layers"], "seconds": seconds, "tolerance": INFLUENCE_TOLERANCE[cfg.dtype],
            "min_spearman": MIN_SPEARMAN, "passed": measured["relative_error"] <= INFLUENCE_TOLERANCE[cfg.dtype] and
            measured["spearman"] >= MIN_SPEARMAN}


def _comparisons(cfg: ScaleConfig, device: torch.device) -> tuple[dict | None, dict | None]:
    """The enforced comparison and the reported wide one (None where not run); an error is reported as a failure."""
    out = []
    for key in ("compare", "compare_wide"):
        if not cfg.compare or cfg.preset[key] is None:
            out.append(None)
            continue
        try:
            out.append(compare_low_precision(cfg, device, *cfg.preset[key]))
        except Exception as e:  # (reported: the check's own failure)
            out.append({"passed": False, "error": _first_line(e)})
        _free(device)
    return out[0], out[1]


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _device(cfg: ScaleConfig) -> torch.device:
    from concept_influence.planted.experiment_config import BenchmarkError

    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise BenchmarkError("--device cuda: no CUDA device is available here (--device cpu runs the tiny size)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _device_memory(cfg: ScaleConfig, device: torch.device) -> int | None:
    if cfg.device_memory is not None or device.type != "cuda":
        return cfg.device_memory
    return torch.cuda.get_device_properties(device).total_memory


def run_scale_check(cfg: ScaleConfig, out_dir: str | Path = "benchmarks", *, log: bool = True,
                    command: str | None = None) -> dict:
    """Run the check as ``cfg`` says; write ``gpu-check.json`` and ``.md`` (``gpu-check-SIZE-DEVICE`` for any other
    size or device than the 7B shape on CUDA) to ``out_dir``; return the result (``result["passed"]``)."""
    started = time.perf_counter()
    device = _device(cfg)
    keys = cfg.preset["model"]
    meta = lora_model_on_meta(qwen2_config(keys, cfg.seq_len), cfg.lora_rank, MODEL_DTYPES[cfg.dtype])
    name = f"Qwen2 {cfg.size} LoRA r={cfg.lora_rank}"
    plan = make_plan(scale_adapter(meta, cfg.selection), cfg.concept_layer, _device_memory(cfg, device),
                     cfg.batch_size, cfg.seq_len, cfg.examples, name)
    if log:
        print(plan.describe(), flush=True)
    meter = StageMeter(device, log=log)  # (on the CPU: the RSS before the model has weights, its libraries loaded)
    scores, error, comparison, wide = None, None, None, None
    if plan.fits:
        train = random_token_examples(cfg.examples, keys["vocab_size"], cfg.seq_len, "train", cfg.seed)
        evals = random_token_examples(cfg.n_eval, keys["vocab_size"], cfg.seq_len, "eval", cfg.seed + 1)
        settings = CurvatureSettings(fisher=cfg.fisher, batch_size=cfg.batch_size, seed=cfg.seed)
        try:
            with meter.stage("load"):
                adapter = scale_adapter(materialise(meta, device, cfg.seed), cfg.selection)
            concept = random_concept_at(adapter, cfg.concept_layer, evals, cfg.seed + 2)
            scores = fit_and_score(adapter, concept, plan, train, train[: cfg.fit_examples], settings, meter,
                                   "cpu" if device.type == "cuda" else None)
        except Exception as e:  # (reported, with the stage it stopped in and that stage's peak: the check's failure)
            error = f"{meter.current[0] if meter.current else 'between stages'}: {_first_line(e)}"
            meter.stop()
            if log:
                print(f"stopped: {error}", flush=True)
        meta = adapter = concept = None
        _free(device)
        comparison, wide = _comparisons(cfg, device)
    total = time.perf_counter() - started
    result = check_result(cfg, device, plan, meter, scores, error, (comparison, wide), total, command)
    write_report(result, out_dir)
    return result
