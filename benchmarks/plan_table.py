"""The memory plans of issue 27 at the paper's scale (concept_influence.plan), from configs alone (meta device):
Qwen2.5-7B with LoRA r = 16 on every linear layer on 1 × 80 GB and 8 × 80 GB, Llama-3-70B (full weight matrices) on
8 × 80 GB, and for reference Qwen2.5-7B's full weight matrices (the issue's 133.6 GB of covariances). Usage, from the
repository root:

    python benchmarks/plan_table.py > benchmarks/plan.md

The same plans from the command line: write the model's config.json to a folder (``paper_config(name).save_pretrained
(folder)``) and run ``concept-influence plan FOLDER --device-memory 80GB --world-size 8 [--lora-rank 16]
[--batch-size 1]``.
"""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

from concept_influence.plan import format_bytes, model_shape, paper_config, plan_memory  # noqa: E402

GB80 = 80 * 10**9
#: (shape, LoRA rank, world size, batch size): batch_size × 512 tokens per rank
ROWS = [("Qwen2.5-7B", 16, 1, 8), ("Qwen2.5-7B", 16, 8, 8), ("Llama-3-70B", None, 8, 1), ("Qwen2.5-7B", None, 1, 8)]


def main() -> None:
    shapes = {}
    plans = []
    for name, rank, world, batch in ROWS:
        key = (name, rank)
        if key not in shapes:
            shapes[key] = model_shape(paper_config(name), lora_rank=rank)
        plan = plan_memory(shapes[key], device_memory=GB80, world_size=world, batch_size=batch, max_length=512)
        today = plan_memory(shapes[key], plan.settings, engine="current")
        plans.append((plan, today))
    out = ["# Memory plans at the paper's scale (issue 27)", "",
           f"Made by `python {' '.join(['benchmarks/plan_table.py', *sys.argv[1:]])} > benchmarks/plan.md` "
           "(`concept_influence.plan`: configs only, models built on the meta device). Devices of 80 GB (10⁹ bytes), "
           "10 % kept free; factors in float32; one concept; 512 tokens per example; all 7 linear maps of every block "
           "(LoRA r = 16 on each of them where LoRA is named). *Partitioned* is the engine issue 27 items 3-4 "
           "describe (partitions of maps, eigendecomposition one map at a time with results off the device, owner "
           "ranks, sharded weights); *current* is what `run` does today, which checks its own plan before any work.",
           "",
           "| model | devices | batch | maps | covariances | partitions per rank | passes over the data (factors) "
           "| query | peak on a device | partitioned | current |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for plan, today in plans:
        s = plan.settings
        peak = max(plan.stages, key=lambda st: st.device)
        query = "full" if plan.query_rank is None else f"rank {plan.query_rank}"
        out.append(f"| {plan.model.name} | {s.world_size} × 80 GB | {s.batch_size} × 512 | {len(plan.model.maps)} "
                   f"| {format_bytes(plan.totals['covariances'])} | {plan.n_partitions} | {plan.factor_passes} "
                   f"| {query} | {format_bytes(peak.device)} ({peak.stage}) | {'fits' if plan.fits else 'does not fit'} "
                   f"| {'fits' if today.fits else 'does not fit'} |")
    for plan, today in plans:
        s = plan.settings
        out += ["", f"## {plan.model.name} on {s.world_size} × 80 GB, batch {s.batch_size} × 512", "", plan.describe(),
                "", "Current engine: " + ("fits." if today.fits else f"does not fit: {today.failure}.")]
    out += ["", "Notes: activations are an estimate (10 widths of d_model and 4 of d_mlp per block and token in the "
                "model's dtype, attention through SDPA, the float32 log-softmax over the vocabulary); Llama-3-70B at "
                "batch 8 × 512 per rank needs 136 GB of activations and fits no 80 GB device, so its row uses 1 × 512. "
                "Its full-size query (274 GB per concept) fits no device either: the plan chooses the largest query rank "
                "that fits (an approximation of the scores; set --query-rank to choose)."]
    print("\n".join(out))


if __name__ == "__main__":
    main()
