"""One transformer block at Qwen2.5-7B's width on the CPU, planned, run and measured (issue 27, item 6;
``concept-influence bench block-width``; ``python -m
concept_influence_benchmarks.block_width --one WIDTH ...`` is one configuration, as the benchmark starts it).

Each configuration (a width, and LoRA r = 16 factors or the full weights tracked) runs in a fresh process: a one-block
Qwen2 model with random float32 weights is built on the ``meta`` device and planned for ``memory`` bytes of host
memory (:mod:`concept_influence.plan`; the CPU is the device here), then given its weights and run as the GPU check
runs (:func:`.scale_check.fit_and_score`): EK-FAC fitted in the plan's partitions, each partition's factors written to
disk per map and freed (the host is the device, so "off the device" is the disk), a random direction of the block's
output preconditioned and random-token examples scored. Per stage, the time and the peak RSS (reset at the start of
each stage, less the process's RSS before the model had weights) beside the plan's bytes.

The widths keep Qwen2.5-7B's head size where they can and its ratio of query to key-value heads; the vocabulary is
8,192 at every width (the block is what is measured; the plan counts the embeddings and logits at whatever vocabulary
it is given). Results go to ``block-width.json`` (one entry per configuration, kept across invocations, so a stopped
benchmark is resumed by running it again) and ``block-width.md``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from concept_influence.curvature import CurvatureSettings
from concept_influence.fileio import atomic_write_text
from concept_influence.models import MapSelection
from concept_influence.plan import format_bytes, parse_bytes
from concept_influence.provenance import machine_description

from .scale_check import StageMeter, fit_and_score, make_plan
from .scale_model import lora_model_on_meta, materialise, qwen2_config, random_concept_at, scale_adapter
from .scale_report import stage_rows
from .speed_size_stages import random_token_examples

__all__ = ["WIDTHS", "BENCH_WIDTHS", "run_one", "run_block_width", "markdown"]

#: Qwen2.5-7B's block (d_model 3584, MLP 18944, 28 query and 4 key-value heads of 128) and narrower ones (1/64: the
#: test's, in seconds).
WIDTHS = {
    "1/64": dict(hidden_size=56, intermediate_size=296, num_attention_heads=7, num_key_value_heads=1),
    "1/8": dict(hidden_size=448, intermediate_size=2368, num_attention_heads=7, num_key_value_heads=1),
    "1/2": dict(hidden_size=1792, intermediate_size=9472, num_attention_heads=14, num_key_value_heads=2),
    "1": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4),
}
#: What each configuration runs on: tokens per example, examples per batch, examples fitting EK-FAC and scored.
DATA = dict(vocab_size=8192, seq_len=128, batch_size=4, fit_examples=8, examples=16, n_eval=4, lora_rank=16, seed=0)
TOLERANCE = 0.15
#: glibc's mmap threshold fixed at 128 KiB in each configuration's process: a freed tensor's pages go back to the
#: system at once, so RSS counts live tensors (as the plan does, and as ``max_memory_allocated`` does on CUDA) and not
#: freed blocks glibc keeps for reuse; its default threshold grows to 32 MiB as tensors are freed, which at 1/8 width
#: (tensors under 32 MiB) kept 1.5-1.8x the plan's bytes resident.
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


def run_one(width: str, weights: str, memory: int) -> dict:
    """One configuration in this process: its plan, per-stage rows (seconds, measured and planned bytes) and the
    peak of the measured stages beside the plan's."""
    d = DATA
    keys = {**WIDTHS[width], "num_hidden_layers": 1, "vocab_size": d["vocab_size"]}
    meta = lora_model_on_meta(qwen2_config(keys, d["seq_len"]), d["lora_rank"], torch.float32)
    name = f"Qwen2.5-7B block at {width} width, {'LoRA r=16' if weights == 'lora' else 'full weights'}"
    plan = make_plan(scale_adapter(meta, MapSelection(), weights), 0, memory, d["batch_size"], d["seq_len"],
                     d["examples"], name)
    result = {"width": width, "weights": weights, "d_model": keys["hidden_size"], "d_mlp": keys["intermediate_size"],
              "memory": memory, "plan": plan.describe(), "fits": plan.fits,
              "partitions": plan.n_partitions, "machine": machine_description()}
    if not plan.fits:
        return result
    train = random_token_examples(d["examples"], d["vocab_size"], d["seq_len"], "train", d["seed"])
    evals = random_token_examples(d["n_eval"], d["vocab_size"], d["seq_len"], "eval", d["seed"] + 1)
    settings = CurvatureSettings(fisher="true", batch_size=d["batch_size"], seed=d["seed"])
    meter = StageMeter(torch.device("cpu"), log=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="block-width-") as factors:
        with meter.stage("load"):
            adapter = scale_adapter(materialise(meta, "cpu", d["seed"]), MapSelection(), weights)
        concept = random_concept_at(adapter, 0, evals, d["seed"] + 2)
        scores = fit_and_score(adapter, concept, plan, train, train[: d["fit_examples"]], settings, meter, None,
                               directory=factors)
    rows = [r for r in stage_rows(plan, meter) if r["runs"]]
    peak = max(rows, key=lambda r: r["measured_bytes"])
    planned = max(rows, key=lambda r: r["planned_bytes"])
    result.update(stages=rows, seconds=time.perf_counter() - started, baseline_bytes=meter.baseline,
                  scores_finite=bool(np.isfinite(scores).all()), measured_peak=peak["measured_bytes"],
                  measured_peak_stage=peak["stage"], planned_peak=planned["planned_bytes"],
                  planned_peak_stage=planned["stage"], process_peak_rss=meter.baseline + peak["measured_bytes"])
    result["peak_ratio"] = result["measured_peak"] / result["planned_peak"]
    return result


def _row(r: dict) -> str:
    if not r.get("stages"):
        return f"| {r['width']} | {r['weights']} | {r['d_model']} / {r['d_mlp']} | – | plan does not fit | | | | |"
    ok = abs(r["peak_ratio"] - 1) <= TOLERANCE
    return (f"| {r['width']} | {r['weights']} | {r['d_model']} / {r['d_mlp']} | {r['partitions']} | "
            f"{format_bytes(r['planned_peak'])} ({r['planned_peak_stage']}) | {format_bytes(r['measured_peak'])} "
            f"({r['measured_peak_stage']}) | **{r['peak_ratio']:.2f}**{'' if ok else ' (over 15 %)'} | "
            f"{format_bytes(r['process_peak_rss'])} | {r['seconds'] / 60:.1f} |")


def _stage_table(r: dict) -> list[str]:
    out = [f"### {r['width']} width, {r['weights']}", "", "| stage | seconds | measured | planned | measured / planned |",
           "|---|---:|---:|---:|---:|"]
    for s in r["stages"]:
        out.append(f"| {s['stage']} | {s['seconds']:.1f} | {format_bytes(s['measured_bytes'])} | "
                   f"{format_bytes(s['planned_bytes'])} | {s['ratio']:.2f} |")
    return out + [""]


def _machine(done: list[dict]) -> str:
    if not done:
        return ""
    m = done[0]["machine"]
    return f"{m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} on {m['torch_threads']} thread(s)."


def markdown(results: dict) -> str:
    """The report of the configurations measured so far."""
    done = sorted(results.values(), key=lambda r: (r["weights"], r["d_model"]))
    d = DATA
    lines = [
        "# One Qwen2.5-7B block on the CPU: the plan's bytes beside the measured peak (issue 27, item 6)", "",
        "`concept-influence bench block-width --out benchmarks` (each configuration in a fresh process; run again to "
        "resume). " + _machine(done), "",
        f"One Qwen2 block (random float32 weights, vocabulary {d['vocab_size']:,}), EK-FAC with the true Fisher fitted "
        f"on {d['fit_examples']} random-token examples of {d['seq_len']} tokens and {d['examples']} scored, batches of "
        f"{d['batch_size']}; planned for {format_bytes(done[0]['memory']) if done else '?'} of host memory (the plan's "
        "device is the CPU here), partitions as the plan cuts them, each partition's factors written per map to disk "
        "and freed. Measured: the peak RSS of the stage (reset at its start through /proc/self/clear_refs) less the "
        "process's RSS before the model had its weights (interpreter, torch, transformers: the process peak adds it "
        "back). Goal: the peak within 15 % of the plan's.", "",
        "| width | tracked | d_model / d_mlp | partitions | planned peak | measured peak | ratio | process peak RSS "
        "| minutes |", "|---|---|---|---:|---|---|---:|---:|---:|",
        *[_row(r) for r in done], "", "## Per stage", "",
    ]
    for r in done:
        if r.get("stages"):
            lines += _stage_table(r)
    lines += ["The whole 28-block model on 1 × 80 GB and 8 × 80 GB, and Llama-3-70B on 8 × 80 GB: "
              "[plan.md](plan.md) (`python benchmarks/plan_table.py`), from the same formulas.", ""]
    return "\n".join(lines)


#: The widths the benchmark runs by default.
BENCH_WIDTHS = ("1/8", "1/2", "1")


def run_block_width(out_dir: str | Path, widths=BENCH_WIDTHS, weights=("lora", "full"), memory: str = "17GiB",
                    force: bool = False) -> dict:
    """Each configuration not yet in ``out_dir/block-width.json`` (all of them with ``force``) in a fresh process,
    the JSON updated after each; the markdown written; the results returned."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "block-width.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for kind in weights:
        for width in widths:
            key = f"{kind}@{width}"
            if key in results and not force:
                continue
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                command = [sys.executable, "-m", "concept_influence_benchmarks.block_width", "--one", width,
                           "--weights", kind, "--memory", memory, "--json", tmp.name]
                subprocess.run(command, check=True, env={**os.environ, **CHILD_ENV})
                results[key] = json.loads(Path(tmp.name).read_text())
            atomic_write_text(path, json.dumps(results, indent=1))
            atomic_write_text(out / "block-width.md", markdown(results))
    return results


def main(argv=None) -> int:
    """One configuration in this process (what :func:`run_block_width` starts): its result written to ``--json``."""
    p = argparse.ArgumentParser(description="one configuration of the block-width benchmark, in this process")
    p.add_argument("--one", required=True, choices=tuple(WIDTHS), help="the width")
    p.add_argument("--weights", required=True, choices=("lora", "full"))
    p.add_argument("--memory", required=True, help="host memory the plan is made for")
    p.add_argument("--json", required=True, help="where to write the result")
    args = p.parse_args(argv)
    Path(args.json).write_text(json.dumps(run_one(args.one, args.weights, parse_bytes(args.memory))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
