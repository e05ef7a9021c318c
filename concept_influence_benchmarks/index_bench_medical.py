"""The index benchmark on the medical benchmark (``concept-influence bench index --part medical``): the
emergent-misalignment good and bad medical advice read as ``bench medical`` reads it, split, trained and probed as it
does at its default settings (or ``--quick``'s), and every projection at equal bytes against exact Concept Influence
and classic influence (:func:`~.index_bench_demo.index_study`), medians over seeds in ``index-medical.md`` and
``.json``. The GPT-2-shape part, the query timing and the demo of ``bench index`` are not run."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from concept_influence.data import load_chats
from concept_influence.planted.experiment_config import PlantedConfig
from concept_influence.planted.splits import medical_files
from concept_influence.provenance import machine_description

from .index_bench_config import IndexBenchConfig
from .index_bench_demo import index_study, planted_setup
from .seeds import SeedReport

__all__ = ["medical_config", "run_index_medical"]


def medical_config(quick: bool, seed: int) -> PlantedConfig:
    """The settings ``bench medical`` runs with at ``seed`` (its default rate 0.1), or with ``--quick``."""
    return (PlantedConfig.quick if quick else PlantedConfig)(paired=True, rate=0.1, seed=seed)


def run_index_medical(out_dir: str | Path, data: str | Path, cfg: IndexBenchConfig | None = None) -> dict:
    """``cfg.seeds`` medical seeds, each :func:`index_study` (``cfg.ranks``, ``cfg.budget``; no checkpoint sum) on the
    medical files in ``data``; writes ``index-medical.json`` and ``index-medical.md`` to ``out_dir`` after every seed
    (the seeds done so far: a run stopped early keeps them). The seeds an earlier report in ``out_dir`` holds, made with
    the same settings, are kept and not run again."""
    from .index_bench_report import format_medical_markdown

    cfg = cfg or IndexBenchConfig()
    files = medical_files(data)
    chats = [load_chats(f) for f in files]
    settings = {"config": asdict(cfg), "data": str(data), "files": [f.name for f in files],
                "planted_config": asdict(medical_config(cfg.quick, 0))}
    report = SeedReport(out_dir, "index-medical", settings, "medical", cfg.seeds, format_medical_markdown)
    report.data.setdefault("machine", machine_description())
    with tempfile.TemporaryDirectory(prefix="concept-influence-index-medical-") as tmp:
        for seed in report.missing:
            print(f"[index bench] medical, seed {seed} ...", flush=True)
            work = Path(tmp) / f"medical{seed}"
            seed_started = time.perf_counter()
            setup = planted_setup(*chats, medical_config(cfg.quick, seed), "tl", work)
            study = index_study(setup, cfg.ranks, cfg.budget, work, checkpoints=False)
            report.data["medical"].append({**study, "seconds": time.perf_counter() - seed_started})
            report.write()
    report.write()  # also when every seed asked for was there already
    return report.data
