"""The inversion and its repair, from a finished family study (``bench emergent --variants``): in the run where the
old default's base-model part ranks the planted data worst, that part with a damped inverse (EK-FAC at 0.1 × mean
eigenvalue, factors on pre-training chats + pool), the same part with the unrolled filter of the steps it stands for,
and the recommended sum. Writes ``OUT/inversion.png`` and ``OUT/inversion.safetensors`` (the three columns and the
labels, a few KB, for the notebook).

    OMP_NUM_THREADS=1 python benchmarks/family_inversion.py runs/family benchmarks/family
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from concept_influence.fileio import load_tensors, save_tensors
from concept_influence.plots import save_figure, subplots
from concept_influence_benchmarks.emergent_config import EmergentConfig
from concept_influence_benchmarks.emergent_splits import build_emergent_data
from concept_influence_benchmarks.family_stability import RECOMMENDED

OLD = "ekfac@0.1|pretrain+pool"
UNROLLED = "unrolled[adam]x1|pretrain+pool"


def base_part(scores: dict, variant: str) -> np.ndarray:
    """A variant's score at the base model alone: its base + final sum minus its final part."""
    return (scores[f"{variant}|base+final"] - scores[f"{variant}|final"]).numpy()


def main(family: Path, out: Path) -> None:
    found = []
    for folder in sorted(family.glob("f*-*")):
        if not (folder / "scores.safetensors").is_file():
            continue
        results = json.loads((folder / "results.json").read_text())
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in results["config"].items()}
        labels = np.array(build_emergent_data(EmergentConfig(**config)).planted)
        scores = load_tensors(folder / "scores.safetensors")
        found.append((roc_auc_score(labels, base_part(scores, OLD)), folder.name, labels, scores))
    auroc, name, labels, scores = min(found, key=lambda f: f[0])
    columns = {"damped inverse, base part": base_part(scores, OLD), "unrolled, base part": base_part(scores, UNROLLED),
               "recommended (source, all parts)": scores[RECOMMENDED].numpy()}
    fig, axes = subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, values) in zip(axes, columns.items()):
        bins = np.linspace(values.min(), values.max(), 40)
        ax.hist(values[labels == 0], bins=bins, alpha=0.6, label="clean")
        ax.hist(values[labels == 1], bins=bins, alpha=0.6, label="planted")
        ax.set_title(f"{title}\nAUROC {roc_auc_score(labels, values):.3f}", fontsize=10)
        ax.set_yscale("log")
    axes[0].legend()
    old, new = columns["damped inverse, base part"], columns["unrolled, base part"]
    verb = "inverts" if auroc < 0.5 else "loses the planted data"
    fig.suptitle(f"{name}: the base model's part of the old default {verb}; the unrolled filter of its steps makes it "
                 f"{np.abs(old).max() / np.abs(new).max():.0f}x smaller (AUROC {auroc:.2f} -> "
                 f"{roc_auc_score(labels, new):.2f})", fontsize=11)
    out.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out / "inversion.png")
    save_tensors(out / "inversion.safetensors", {**{k: torch.as_tensor(v) for k, v in columns.items()},
                                                  "labels": torch.as_tensor(labels)}, {"run": name})
    print(f"{name}: base part AUROC {auroc:.3f} (damped inverse); written {out / 'inversion.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
