"""Peak memory of the speed benchmark's stages: each stage runs again in its own subprocess."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Callable, TypeVar

import torch

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import Curvature, fit_curvature
from concept_influence.estimators import ConceptInfluence, ProbeProjection
from concept_influence.fileio import load_tensors
from concept_influence.toy.small_model import train_model
from probes import ConceptDirection

from .bergson_bridge import bergson_concept_scores, import_bergson
from .kronfluence_bridge import DAMPING_FACTOR, KRONFLUENCE_MODES, kronfluence_concept_scores, ours_fit_and_score
from .speed_setup import STAGES_A, SpeedConfig, llama_speed_adapter, prepare_speed_data, tl_speed_adapter

__all__ = ["peak_memory", "memory_stage", "measure_peak", "reset_peak_rss", "peak_rss", "run_child"]

T = TypeVar("T")


def _rss_kib(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) resident set size of this process, in KiB (Linux)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(f"{field}:"))


def reset_peak_rss() -> int | None:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (after a garbage collection); the current RSS in
    bytes, or None without Linux ``/proc``."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak RSS (VmHWM) to the current RSS
            fh.write("5")
        return _rss_kib("VmRSS") * 1024
    except OSError:
        return None


def peak_rss() -> int:
    """This process's peak RSS in bytes since it started or since :func:`reset_peak_rss` (Linux)."""
    return _rss_kib("VmHWM") * 1024


def measure_peak(run: Callable[[], T]) -> tuple[T, dict]:
    """``run()`` with this process's peak RSS reset just before it: its value and ``{"peak_mib", "rise_mib"}`` (the
    peak during the call and its rise over the RSS before it), or ``{}`` without Linux ``/proc``."""
    before = reset_peak_rss()
    if before is None:
        return run(), {}
    value = run()
    peak = peak_rss()
    return value, {"peak_mib": peak / 2**20, "rise_mib": (peak - before) / 2**20}


def run_child(code: str, what: str) -> dict:
    """Run the Python ``code`` in a fresh offline process; the JSON object its last printed line holds."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the {what} subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_stage(stage: str, work: Path) -> None:
    """Child process: load model and data from ``work``, reset the peak RSS, run ``stage`` on the first
    ``memory_examples`` examples and print the stage's peak RSS and its rise over the RSS before it (MiB)."""
    cfg = SpeedConfig(**json.loads((work / "config.json").read_text()))
    torch.set_num_threads(cfg.threads)
    data = prepare_speed_data(cfg, work, train_tokenizer=False)
    bs = cfg.batch_size
    if stage in STAGES_A:
        adapter, suffix, examples = tl_speed_adapter(cfg, data.tokenizer), "tl", data.train[: cfg.memory_examples]
    else:
        adapter, suffix, examples = (llama_speed_adapter(cfg, data.tokenizer), "hf",
                                     data.train[: min(cfg.memory_examples, cfg.kron_n_train)])
    adapter.model.load_state_dict(load_tensors(work / f"model_{suffix}.safetensors"))
    concept = ConceptFunction.from_directions(ConceptDirection.load(work / f"direction_{suffix}.safetensors"),
                                              eval_examples=data.evals)
    runs = {
        "train_step": lambda: train_model(adapter, examples, 1, cfg.lr, bs, tokens="response", seed=cfg.seed, progress=False),
        "ekfac_fit": lambda: fit_curvature(adapter, examples, maps=cfg.concept_layer, batch_size=bs, seed=cfg.seed,
                                           progress=False),
        "concept_influence": lambda: ConceptInfluence(concept, Curvature.load(work / "curvature_tl", adapter)).score(
            adapter, examples, batch_size=bs, progress=False),
        "probe_projection": lambda: ProbeProjection(concept).score(adapter, examples, batch_size=bs, progress=False),
        "ours": lambda: ours_fit_and_score(adapter, examples, concept, bs, cfg.seed),
        **{f"kronfluence_{mode}": partial(kronfluence_concept_scores, adapter, examples, concept, work / "kronfluence_memory",
                                          bs, cfg.seed, (mode,)) for mode in KRONFLUENCE_MODES},
        "bergson": partial(bergson_concept_scores, adapter, examples, concept, work / "bergson_memory", bs, cfg.seed,
                           DAMPING_FACTOR),
    }
    if stage == "bergson":
        import_bergson()  # its imports hold ~140 MiB, which is not the stage's (kronfluence's hold ~1 MiB)
    _, memory = measure_peak(runs[stage])
    print(json.dumps({"peak_mib": memory["peak_mib"], "increase_mib": memory["rise_mib"]}))


def peak_memory(stage: str, work: Path) -> dict:
    code = ("from concept_influence_benchmarks.speed_memory import memory_stage; "
            f"memory_stage({stage!r}, __import__('pathlib').Path({str(work)!r}))")
    return run_child(code, f"peak-memory for stage {stage!r}")
