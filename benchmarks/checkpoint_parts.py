"""Where the checkpoint sum's signal comes from: each part of Concept Influence summed over checkpoints, from the
score files that the demo and `bench emergent` runs keep.

``concept_influence[checkpoints]`` is the score at the pre-trained model plus the score at the fine-tuned one
(``concept_influence``), so the pre-trained part is their difference. For each run this prints the AUROC of each part
against the planted labels, and how large the planted examples' scores are in each part (their median score over the
clean examples' interquartile range). Usage, from the repository root:

    python benchmarks/checkpoint_parts.py runs/demo-seeds/demo-s*/ runs/emergent/*-s*/ > benchmarks/checkpoint_parts.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from concept_influence.evaluation import retrieval_metrics
from concept_influence.scores import Scores
from concept_influence_benchmarks.emergent_config import EmergentConfig
from concept_influence_benchmarks.emergent_splits import build_emergent_data

PAIRS = {"fine-tuned (pool factors)": ("concept_influence", "concept_influence[checkpoints]"),
         "fine-tuned (pre-train + pool factors)": ("concept_influence[pretrain+pool]",
                                                   "concept_influence[pretrain+pool][checkpoints]")}


def planted_labels(run: Path, ids: list[str]) -> np.ndarray:
    """The demo's ids name their file (reckless.jsonl is planted); an emergent run's pool is rebuilt from its config."""
    if all(":" in i and i.split(":")[0].endswith(".jsonl") for i in ids):
        return np.array([i.startswith("reckless.jsonl:") for i in ids], dtype=int)
    config = json.loads((run / "results.json").read_text())["config"]
    data = build_emergent_data(EmergentConfig(**config))
    by_id = {c.id: label for c, label in zip(data.pool, data.planted)}
    return np.array([by_id[i] for i in ids], dtype=int)


def planted_size(scores: np.ndarray, labels: np.ndarray) -> float:
    """The planted examples' median score, in interquartile ranges of the clean examples' scores."""
    clean = scores[labels == 0]
    return float((np.median(scores[labels == 1]) - np.median(clean)) / np.subtract(*np.percentile(clean, [75, 25])))


def rows(run: Path) -> list[str]:
    out = []
    for factors, (final_name, summed_name) in PAIRS.items():
        if not (run / "scores" / f"{summed_name}.safetensors").is_file():
            continue
        final, summed = (Scores.load(run / "scores" / f"{n}.safetensors") for n in (final_name, summed_name))
        labels = planted_labels(run, list(final.ids))
        total = summed.aligned(final.ids)[:, 0]
        parts = {"fine-tuned": final.column(0), "pre-trained": total - final.column(0), "sum": total}
        aurocs = " | ".join(f"{retrieval_metrics(v, labels)['auroc']:.3f}" for v in parts.values())
        sizes = " | ".join(f"{planted_size(v, labels):+.1f}" for v in parts.values())
        out.append(f"| {run.name} | {factors.split('(')[1][:-1]} | {aurocs} | {sizes} |")
    return out


def main(paths: list[str]) -> None:
    print("# Concept Influence over checkpoints, part by part\n")
    print(f"Made by `python benchmarks/checkpoint_parts.py {' '.join(paths)}`.\n")
    print("| run | factors | AUROC fine-tuned | pre-trained | sum | planted size fine-tuned | pre-trained | sum |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        for line in rows(Path(path)):
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
