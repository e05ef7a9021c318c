"""The GPU check's result (:mod:`.scale_check`): per stage the time and the measured peak beside the plan's bytes, the
checks that decide its exit status, and the JSON and markdown files it writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from concept_influence.fileio import atomic_write_text
from concept_influence.plan import STAGES, format_bytes
from concept_influence.provenance import machine_description

__all__ = ["RUN_STAGES", "stage_rows", "check_result", "report_stem", "write_report", "markdown"]

#: The stages the check runs, in order (the plan's ``index build`` is planned, not run).
RUN_STAGES = ("load", "covariance pass", "eigendecomposition", "eigenvalue pass", "query", "scoring")

_CPU_MEMORY = ("peak RSS of the process, reset at the start of each stage (/proc/self/clear_refs), less its RSS just "
               "before the model was given its weights (interpreter, torch, libraries); one process, no fresh process "
               "per stage")
_CUDA_MEMORY = "torch.cuda.max_memory_allocated, reset at the start of each stage (tensors; no allocator cache or context)"


def _check(name: str, passed: bool, enforced: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "enforced": enforced, "detail": detail}


def stage_rows(plan, meter) -> list[dict]:
    planned = {st.stage: st.device for st in plan.stages}
    rows = []
    for stage in STAGES:
        rec = meter.stages.get(stage, {})
        measured, bytes_planned = rec.get("measured_bytes"), planned.get(stage)
        rows.append({"stage": stage, "seconds": rec.get("seconds"), "runs": rec.get("runs", 0),
                     "measured_bytes": measured, "peak_bytes": rec.get("peak_bytes"),
                     "reserved_bytes": rec.get("reserved_bytes"), "planned_bytes": bytes_planned,
                     "ratio": measured / bytes_planned if measured is not None and bytes_planned else None})
    return rows


def _agreement(c: dict) -> str:
    return c.get("error") or (f"{c['compared']} at d_model {c['d_model']}: relative error {c['relative_error']:.4f} "
                              f"(≤ {c['tolerance']}), Spearman {c['spearman']:.4f} (≥ {c['min_spearman']})")


def check_result(cfg, device: torch.device, plan, meter, scores, error: str | None,
                 comparisons: tuple[dict | None, dict | None], seconds: float, command: str | None) -> dict:
    """Everything the check found, as the JSON it writes; ``passed``: every enforced check passed. ``comparisons``: the
    enforced low-precision comparison and the reported wide one (None: not run)."""
    comparison, wide = comparisons
    rows = stage_rows(plan, meter)
    ran = [r for r in rows if r["runs"]]
    checks = [_check("the plan fits", plan.fits, True, plan.summary())]
    if plan.fits:
        missing = [s for s in RUN_STAGES if s not in meter.stages]
        checks.append(_check("every stage ran", error is None and not missing, True,
                             error or (f"not run: {', '.join(missing)}" if missing else ", ".join(RUN_STAGES))))
        ok = scores is not None and bool(np.isfinite(scores).all() and np.any(scores != 0))
        checks.append(_check("the scores are finite and not all zero", ok, True,
                             "no scores" if scores is None else f"{len(scores)} examples"))
        measured = max((r["measured_bytes"] for r in ran if r["measured_bytes"] is not None), default=None)
        planned = max((r["planned_bytes"] for r in ran if r["planned_bytes"]), default=None)
        ratio = measured / planned if measured is not None and planned else None
        within = ratio is not None and abs(ratio - 1) <= cfg.peak_tolerance
        cuda = device.type == "cuda"
        detail = (f"measured peak {format_bytes(measured or 0)} / planned {format_bytes(planned or 0)} = "
                  f"{ratio:.3f}" if ratio is not None else "no peak measured")
        checks.append(_check(f"the peak within {cfg.peak_tolerance:.0%} of the plan's", within, cuda,
                             detail + ("" if cuda else " (reported, not enforced on the CPU: the plan counts tensors on "
                                                       "a device; the RSS of a small run is mostly the allocator's and "
                                                       "the libraries')")))
        if comparison is not None:
            checks.append(_check("low precision agrees with float32", comparison["passed"], True, _agreement(comparison)))
        if wide is not None:
            checks.append(_check("low precision agrees with float32 at the wider width", wide["passed"], False,
                                 _agreement(wide)))
    if cfg.time_budget is not None:
        checks.append(_check(f"within {cfg.time_budget:.0f} s", seconds <= cfg.time_budget, True, f"{seconds:.0f} s"))
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "preset"}
    model = cfg.preset["model"]
    return {
        "command": command or "concept-influence bench gpu-check", "size": cfg.size, "settings": settings,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": machine_description(), "memory_measured_as": _CUDA_MEMORY if device.type == "cuda" else _CPU_MEMORY,
        "model": {"d_model": model["hidden_size"], "d_mlp": model["intermediate_size"],
                  "blocks": model["num_hidden_layers"], "vocab": model["vocab_size"], "dtype": cfg.dtype,
                  "lora_rank": cfg.lora_rank, "tracked_maps": len(plan.model.maps),
                  "concept_hook": f"blocks.{cfg.concept_layer}.hook_resid_post"},
        "plan": {"summary": plan.summary(), "fits": plan.fits, "failure": plan.failure,
                 "partitions": plan.n_partitions, "factor_passes": plan.factor_passes,
                 "device_memory": plan.settings.device_memory, "totals": plan.totals,
                 "stages": [dataclasses.asdict(st) for st in plan.stages]},
        "stages": rows, "error": error,
        "scores": None if scores is None else {"n": len(scores), "mean": float(np.mean(scores)),
                                               "std": float(np.std(scores)), "min": float(np.min(scores)),
                                               "max": float(np.max(scores))},
        "comparison": comparison, "comparison_wide": wide, "checks": checks, "seconds": seconds,
        "passed": all(c["passed"] for c in checks if c["enforced"]),
    }


def report_stem(size: str, device: str) -> str:
    """``gpu-check`` for the Qwen2.5-7B shape on CUDA (the committed result), ``gpu-check-SIZE-DEVICE`` otherwise."""
    return "gpu-check" if (size, device) == ("qwen2.5-7b", "cuda") else f"gpu-check-{size}-{device}"


def write_report(result: dict, out_dir: str | Path) -> Path:
    """``STEM.json`` and ``STEM.md`` in ``out_dir``; returns the markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(result["size"], result["settings"]["device"])
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / f"{stem}.md", markdown(result))
    return out / f"{stem}.md"


def _bytes(n) -> str:
    return "—" if n is None else format_bytes(n)


def markdown(result: dict) -> str:
    s, m, p = result["settings"], result["model"], result["plan"]
    lines = [f"# GPU check: Concept Influence at the {result['size']} shape (issue 27, item 5)", "",
             f"`{result['command']}` on {result['device']} (torch {result['machine']['torch']}): "
             f"{'**passed**' if result['passed'] else '**FAILED**'} in {result['seconds']:.0f} s.", "",
             f"Model: Qwen2, d_model {m['d_model']}, d_mlp {m['d_mlp']}, {m['blocks']} blocks, vocabulary {m['vocab']}, "
             f"random weights in {m['dtype']}, PEFT LoRA r = {m['lora_rank']} on all 7 linear maps; tracked: the "
             f"{m['tracked_maps']} LoRA factors of blocks {s['blocks']}; concept: a random direction at "
             f"`{m['concept_hook']}`, read at the last prompt token of {s['n_eval']} examples. Data: {s['examples']} "
             f"random-token examples of {s['seq_len']} tokens scored (the second half the response), the first "
             f"{s['fit_examples']} fitting EK-FAC ({s['fisher']} Fisher), {s['batch_size']} per batch.", "",
             f"Plan, made on the meta device before any weight existed: {p['summary']}", "",
             "| stage | seconds | runs | measured peak | planned | measured / planned |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["stages"]:
        seconds = "not run" if r["seconds"] is None else f"{r['seconds']:.1f}"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['stage']} | {seconds} | {r['runs']} | {_bytes(r['measured_bytes'])} | "
                     f"{_bytes(r['planned_bytes'])} | {ratio} |")
    lines += ["", f"Measured peak: {result['memory_measured_as']}. Runs: a pass is run once per partition.", ""]
    for c, what in ((result["comparison"], "enforced"), (result.get("comparison_wide"), "reported")):
        if c and "error" not in c:
            lines += [f"Low precision at reduced width ({what}; d_model {c['d_model']}, d_mlp {c['d_mlp']}, {c['blocks']} "
                      f"blocks, {c['examples']} examples of {c['seq_len']} tokens, empirical Fisher): {c['compared']}, "
                      f"relative error {c['relative_error']:.4f}, Spearman {c['spearman']:.4f}.", ""]
    lines += ["Checks (enforced ones decide the exit status):", ""]
    for ch in result["checks"]:
        mark = "passed" if ch["passed"] else "FAILED" if ch["enforced"] else "missed"
        lines.append(f"- {ch['name']}: {mark}{'' if ch['enforced'] else ' (not enforced)'} — {ch['detail']}")
    return "\n".join(lines) + "\n"
