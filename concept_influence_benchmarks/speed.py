"""Speed benchmark: cost per example of each path, factor fitting, peak memory, kronfluence and Bergson.

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
  ``+∇fᵀ(G+λI)⁻¹∇L``) and time ratios, interleaved over rounds too. When Bergson 2.5.1 is installed, its
  EK-FAC pipeline runs beside them on our ∇f (:mod:`.bergson_bridge`, which lists what still differs);
  otherwise the table says why in a row.
* Peak memory: each stage runs again in its own subprocess on the first ``memory_examples`` examples,
  after loading model and data; the peak resident set size is reset just before the stage (Linux
  ``/proc/self/clear_refs``) and read after it (``VmHWM``): the stage's peak RSS and its rise over the RSS
  before it. (``ru_maxrss`` cannot separate stages: it keeps the peak of loading, and a child started by
  ``vfork`` inherits its parent's; tracemalloc does not see tensor memory.)

This module times part A and writes the report; the configuration, data and models are in :mod:`.speed_setup`,
part B in :mod:`.kronfluence_bridge` and the peak-memory subprocesses in :mod:`.speed_memory`.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch

from concept_influence.curvature import fit_curvature
from concept_influence.data import TokenizedExample
from concept_influence.estimators import ConceptInfluence, ProbeProjection
from concept_influence.fileio import atomic_write_text, save_tensors
from concept_influence.models import ModelAdapter
from concept_influence.provenance import machine_description
from concept_influence.toy.small_model import train_model

from .kronfluence_bridge import KRONFLUENCE_SETTINGS, run_part_b
from .speed_memory import peak_memory
from .speed_setup import (
    STAGES_A,
    SpeedConfig,
    SpeedData,
    count_tokens,
    prepare_speed_data,
    speed_concept,
    tl_speed_adapter,
    trained_speed_model,
)

__all__ = ["SpeedConfig", "run_speed_benchmark", "format_markdown"]

LABELS_B = {"kronfluence_aggregated": "kronfluence, ∇f aggregated", "kronfluence_per_query": "kronfluence, per query",
            "bergson": "Bergson"}
LABELS_A = {
    "train_step": "training step (fwd + bwd + AdamW)",
    "concept_influence": "concept_influence scoring (EK-FAC query)",
    "probe_projection": "probe_projection (forward to the concept's block)",
    "ekfac_fit": "EK-FAC fit (covariances + eigenvalue correction)",
}


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


def _part_a(cfg: SpeedConfig, data: SpeedData, work: Path) -> dict:
    adapter = trained_speed_model(tl_speed_adapter(cfg, data.tokenizer), cfg, data)
    concept, probe_metrics = speed_concept(adapter, cfg, data, work / "direction_tl.safetensors")
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
        "probe_projection": lambda: _seconds(
            lambda: ProbeProjection(concept).score(adapter, train, batch_size=bs, progress=False)),
        "ekfac_fit": lambda: _seconds(fit),
        "query_gradient": lambda: _seconds(lambda: curvature.precondition(concept.gradient(adapter, maps, batch_size=bs))),
    }
    times = _interleaved(stages, cfg.rounds)
    n, n_tokens = len(train), count_tokens(train)
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
        f"transformer-lens {m['transformer_lens']}, kronfluence {m['kronfluence'] or 'not installed'}, "
        f"bergson {m['bergson'] or 'not installed'}; "
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
        f"| full scoring / training step (per example) | {r['scoring_over_train_step']:.2f}× | "
        f"{_check(r['scoring_over_train_step'], '≤ 3')} |",
        f"| probe_projection speed-up over full scoring (per example) | {r['probe_projection_speedup']:.1f}× | "
        f"{_check(r['probe_projection_speedup'], '≥ 30')} |",
        f"| probe_projection speed-up over EK-FAC fit + full scoring | {r['end_to_end_over_probe_projection']:.1f}× | — |",
        f"| EK-FAC fit / one training epoch | {r['ekfac_fit_over_train_epoch']:.2f}× | — |", "",
        "## B. Against kronfluence and Bergson", "",
    ]
    if "error" in b:
        lines.append(f"Not run: {b['error']}")
    else:
        p, berg = b["pipelines"], b["bergson"]
        names = tuple(p)  # ours, kronfluence's two query modes, Bergson when it ran

        def row(label: str, cell: Callable[[str], str]) -> str:
            return f"| {label} | " + " | ".join(cell(name) for name in names) + " |"

        def seconds(key: str, ratio: str) -> Callable[[str], str]:
            return lambda n: f"{p[n][key]:.2f}" + ("" if n == "ours" else f" ({p[n][ratio]:.2f}×)")

        bergson_note = (
            f"Bergson {berg['version']} runs its EK-FAC pipeline (fit, preconditioner, scoring pass) on the same "
            "model, modules and damping, with our ∇f as its query and our sampled labels as its dataset labels "
            f"(sampling them, a forward pass not counted in its times, took {berg['label_seconds']:.2f} s); its "
            f"per-map dampings are a median {berg['damping_ratio_median']:.1f}× ours (see below). "
        ) if "error" not in berg else ""
        lines += [
            f"{b['model']}, trained briefly on the demo corpus; {b['n_examples']} examples ({b['n_tokens']} tokens), "
            f"batch size {b['batch_size']}; concept: logistic probe at `{b['hook_name']}` (held-out accuracy "
            f"{b['probe_accuracy']:.3f}), {b['n_eval_examples']} evaluation examples. Both sides use the same measurement, "
            f"training loss, sampled Fisher labels and {len(b['tracked_modules'])} tracked `nn.Linear` modules (blocks ≤ "
            f"{results['config']['concept_layer']}), damping 0.1 × mean(Λ) per map (largest relative difference of the "
            f"per-map dampings: {b['damping_max_relative_difference']:.1e}). kronfluence is timed in two query modes "
            f"on one factor fit: ∇f aggregated before preconditioning, and its default pairwise mode, one query per "
            f"evaluation example (query × train scores, summed). {bergson_note}Median of {b['rounds']} interleaved "
            "rounds; in brackets, the other tool's time over ours.", "",
            "| | " + " | ".join(LABELS_B.get(n, n) for n in names) + " |", "| --- |" + " ---: |" * len(names),
            row("EK-FAC fit (s)", seconds("fit_seconds", "slowdown_fit")),
            row("scoring incl. query gradient (s)", seconds("score_seconds", "slowdown_scoring")),
            row("total (s)", seconds("total_seconds", "slowdown_total")),
            row("peak RSS, fit + score (MiB)", lambda n: _mib(mem[n], "peak_mib")),
            row("rise over the RSS before (MiB)", lambda n: _mib(mem[n], "increase_mib")),
            row("Spearman with ours (goal ≥ 0.99)", lambda n: "—" if n == "ours" else f"{p[n]['spearman']:.4f}"),
            row("Pearson with ours", lambda n: "—" if n == "ours" else f"{p[n]['pearson']:.4f}"),
        ]
        if "error" in berg:
            lines.append(f"| Bergson | not run: {berg['error']} |" + " |" * (len(names) - 1))
        lines += [
            "",
            "Sign: kronfluence's pairwise score and Bergson's are +∇fᵀ(G+λI)⁻¹∇L(z), ours −∇fᵀ(G+λI)⁻¹∇L(z); the table "
            "compares ours with their negation. Goal, ours ≥ 5× faster (total / scoring): " + "; ".join(
                f"{LABELS_B[n]}: {_check(p[n]['slowdown_total'], '≥ 5')} / {_check(p[n]['slowdown_scoring'], '≥ 5')}"
                for n in names[1:]) + ".", "",
            "kronfluence settings: " + "; ".join(f"`{key}`: {val}" for key, val in KRONFLUENCE_SETTINGS.items()) + ".",
        ]
        if "error" not in berg:
            lines += ["", "Bergson settings: " + "; ".join(f"`{key}`: {val}" for key, val in berg["settings"].items())
                      + f". What still differs from ours: {berg['differences']}."]
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
            data = prepare_speed_data(cfg, work, train_tokenizer=True)
            results["part_a"] = _part_a(cfg, data, work)
            results["part_b"] = run_part_b(cfg, data, work) if kronfluence else {"error": "skipped (kronfluence=False)"}
            atomic_write_text(work / "config.json", json.dumps(asdict(cfg)))
            stages = STAGES_A + tuple(results["part_b"].get("pipelines", ()))
            linux = Path("/proc/self/clear_refs").exists()
            results["memory"] = {stage: peak_memory(stage, work) if linux else None for stage in stages}
    finally:
        torch.set_num_threads(threads)
    results["load_average_end"] = list(os.getloadavg())
    results["total_seconds"] = time.perf_counter() - started
    report = format_markdown(results)
    atomic_write_text(out / "speed.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "speed.md", report)
    print(report)
    return results
