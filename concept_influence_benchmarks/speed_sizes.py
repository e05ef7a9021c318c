"""Speed at real model sizes: the cost per example of each stage on a randomly initialised model of a named shape.

No weights are needed to measure speed, so the model is a bias-free Llama-style causal LM with the shape of
GPT-2 small or Qwen2.5-0.5B (kronfluence 1.0.1 tracks ``nn.Linear`` modules with their biases and not GPT-2's
``Conv1D``, so a bias-free ``nn.Linear`` model is what both libraries can track identically). The data are random
token sequences (the first half prompt, the second half response) and the concepts random unit directions at
``blocks.{concept_layer}.hook_resid_post``; every weight matrix of blocks ``0..concept_layer`` is tracked.

Measured in one run, one stage after the other, each over the same examples and batch size:

* **floor** — one forward plus a backward to the activations only (no weight gradients): what any gradient-based
  attribution of every example has to pay;
* training step (forward, backward, AdamW), EK-FAC fit (both data passes and the eigendecompositions),
  Concept Influence scoring for K = 1 and K concepts at once, at full rank and with the low-rank query, the fast path
  (``probe_projection``), and kronfluence's EK-FAC scores of the same concept (same maps, sampled-label Fisher,
  damping 0.1 × mean eigenvalue per map, float32), with their Spearman correlation against ours.

Each stage also reports its FLOPs, counted by ``torch.utils.flop_counter.FlopCounterMode`` on one batch (matrix
products and attention; eigendecompositions are not counted), and its peak resident memory (Linux ``VmHWM`` reset
before the stage) with its rise over the memory before it.

Modules: :mod:`.speed_size_stages` (the shapes, model, data and stages), this one (running and timing them),
:mod:`.speed_sizes_report` (the markdown table).
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from concept_influence.fileio import atomic_write_text
from concept_influence.provenance import machine_description

from .bergson_bridge import bergson_unavailable
from .speed_memory import measure_peak, run_child
from .speed_size_stages import COMPARED_LIBRARIES, SIZES, SizeConfig, compared, random_examples, selected, size_model, size_stages
from .speed_sizes_report import format_size_markdown

__all__ = ["SIZES", "SizeConfig", "run_size_benchmark", "format_size_markdown"]


def _measure(run: Callable[[], object]) -> dict:
    """Seconds, peak RSS and its rise over the RSS before (MiB; absent without Linux /proc) of one call."""
    timed = {}

    def timed_run():
        start = time.perf_counter()
        value = run()
        timed["seconds"] = time.perf_counter() - start
        return value

    value, memory = measure_peak(timed_run)
    return {"seconds": timed["seconds"], **memory, "value": value}


def _flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def own_process_memory(cfg: SizeConfig, stages: Sequence[str]) -> dict[str, dict]:
    """Peak RSS and rise of each of ``stages``, each run alone in a fresh Python process (:func:`memory_child`): in one
    process, memory freed by an earlier stage and kept by the allocator hides part of a later stage's rise."""
    out = {}
    for stage in stages:
        print(f"[{cfg.size}] memory of {stage} in its own process ...", flush=True)
        code = (f"from concept_influence_benchmarks.speed_size_stages import memory_child; "
                f"memory_child({json.dumps(asdict(cfg))!r}, {stage!r})")
        out[stage] = run_child(code, f"memory of {stage!r}")
    return out


def _repeat_compared(cfg: SizeConfig, stages: dict[str, Callable], results: dict[str, dict], train: list) -> None:
    """Run the compared pipelines (:func:`compared`) ``cfg.rounds - 1`` more times, in reversed order every other
    round (the first run is the one already in ``results``), and make each one's ``seconds`` (and a library's
    ``fit_seconds`` and ``score_seconds``) the median over the runs, keeping every run's figures beside it."""
    groups = [group for group in compared(cfg) if all(name in results for name in group)]
    runs = {name: [_timing(results[name])] for group in groups for name in group}
    for r in range(1, cfg.rounds):
        for group in groups[::-1] if r % 2 else groups:
            for name in group:
                print(f"run {r + 1} of {name} ...", flush=True)
                gc.collect()
                start = time.perf_counter()
                value = stages[name](train)
                runs[name].append(_timing({"seconds": time.perf_counter() - start, "value": value}))
    for name, timings in runs.items():
        for key in timings[0]:
            figures = [t[key] for t in timings]
            results[name].update({key: statistics.median(figures), f"all_{key}": figures})


def _timing(measured: dict) -> dict:
    """A stage run's seconds, with a library's fit and scoring seconds when it reports them."""
    value = measured.get("value")
    extra = {key: value[key] for key in ("fit_seconds", "score_seconds")} if isinstance(value, dict) else {}
    return {"seconds": measured["seconds"], **extra}


def run_size_benchmark(out_dir: str | Path, cfg: SizeConfig | None = None) -> dict:
    """Measure every stage at the configured size; write ``speed-{size}.json`` and ``speed-{size}.md`` to ``out_dir``."""
    from scipy.stats import spearmanr

    cfg = cfg or SizeConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    machine = machine_description()
    started = time.perf_counter()
    # first, while this process holds no model: at qwen-0.5b size this process's model, factors and queries (about
    # 15 GB) beside a child ran a 24 GB machine out of memory
    alone = selected(cfg, [name for group in compared(cfg) for name in group])
    own = own_process_memory(cfg, alone) if cfg.memory_examples else {}
    adapter = size_model(cfg)
    train = random_examples(cfg.n_examples, cfg, "train", cfg.seed)
    evals = random_examples(cfg.n_eval, cfg, "eval", cfg.seed + 1)
    results: dict[str, dict] = {}
    state: dict = {}
    with tempfile.TemporaryDirectory(prefix="concept-influence-size-") as work:
        stages = size_stages(cfg, adapter, evals, Path(work), state)
        for name, run in stages.items():
            print(f"[{cfg.size}] {name} ...", flush=True)
            if name.startswith("concept_influence"):
                run(train[:1])  # computes the preconditioned queries (a fixed cost per concept, reported apart)
            # FLOPs on one batch first: the timed run on every example then leaves the fitted curvature behind
            flops = _flops(lambda run=run: run(train[: cfg.batch_size])) / cfg.batch_size
            measured = _measure(lambda run=run: run(train))
            results[name] = {**measured, **_timing(measured), "flops_per_example": flops}
            state.pop("clone", None)  # the training step's model copy and optimiser state
        _repeat_compared(cfg, stages, results, train)
    for entry in results.values():
        entry["seconds_per_example"] = entry["seconds"] / len(train)
    for name, entry in results.items():
        if name.startswith("concept_influence"):
            k = int(name.removeprefix("concept_influence_k").removesuffix("_lowrank"))
            entry["query_seconds"] = state[f"query_seconds_{k}_{cfg.query_rank if 'lowrank' in name else None}"]
    values = {name: entry.pop("value") for name, entry in results.items()}
    for name, entry in results.items():
        full = values.get(name.removesuffix("_lowrank"))
        if name.endswith("_lowrank") and full is not None:  # the lowest over the K concepts
            entry["spearman_vs_full_rank"] = min(float(spearmanr(full.column(k), values[name].column(k)).statistic)
                                                 for k in range(len(full.columns)))
        library, _, k = name.rpartition("_k")
        if library in COMPARED_LIBRARIES:  # the lowest over the K concepts
            ours = values[f"concept_influence_k{k}"]
            entry["spearman_vs_ours"] = min(float(spearmanr(ours.column(j), values[name]["scores"][:, j]).statistic)
                                            for j in range(int(k)))
    report = {"config": asdict(cfg), "machine": machine, "own_process_memory": own, "shape": SIZES[cfg.size],
              "parameters": sum(p.numel() for p in adapter.model.parameters()),
              "tracked_maps": len(adapter.linear_maps(cfg.concept_layer)), "stages": results,
              "bergson": bergson_unavailable() if cfg.kronfluence else "not asked for",
              "total_seconds": time.perf_counter() - started}
    atomic_write_text(out_dir / f"speed-{cfg.size}.json", json.dumps(report, indent=1))
    atomic_write_text(out_dir / f"speed-{cfg.size}.md", format_size_markdown(report))
    return report


