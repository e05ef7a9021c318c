"""One benchmark over several seeds, as distributions: each estimator's median, worst run and spread; and the seeds a
benchmark's earlier report already holds, so that asking for more seeds runs only the new ones."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

__all__ = ["seed_statistics", "format_seeds_table", "SeedReport"]


def _but_seeds(settings: dict) -> dict:
    """``settings`` as JSON reads them back, without the number of seeds of any ``config`` in it."""
    plain = json.loads(json.dumps(settings))
    if isinstance(plain.get("config"), dict):
        plain["config"].pop("seeds", None)
    return plain


def _earlier_report(path: Path, settings: dict) -> dict | None:
    """The report (JSON) a benchmark wrote at ``path`` when its ``settings`` (every key of ``settings``; a ``config``
    compared without its number of seeds) were these, so that a run asking for more seeds keeps the ones done; None,
    saying why on stdout, when there is no such file or it was made with other settings."""
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    wanted, had = _but_seeds(settings), _but_seeds({k: report.get(k) for k in settings})
    if wanted != had:
        changed = sorted(k for k in wanted if wanted[k] != had[k])
        print(f"[bench] {path}: made with other settings ({', '.join(changed)}); starting again", flush=True)
        return None
    return report


class SeedReport:
    """A benchmark's report over seeds (``data``: ``settings``, the list of seed results under ``key``, and what the
    benchmark adds), written as ``NAME.json`` and ``NAME.md`` in ``out_dir``. An earlier report there made with the
    same settings is taken up (:func:`_earlier_report`): its seeds are kept, up to ``seeds``, and :attr:`missing` are
    the ones to run; ``invocations`` counts the runs that added seeds, ``total_seconds`` their time."""

    def __init__(self, out_dir: str | Path, name: str, settings: dict, key: str, seeds: int,
                 markdown: Callable[[dict], str]):
        self.paths = Path(out_dir) / f"{name}.json", Path(out_dir) / f"{name}.md"
        self.markdown, self.started = markdown, time.perf_counter()
        earlier = _earlier_report(self.paths[0], settings)
        self.data = earlier or {}
        self.earlier_seconds = self.data.get("total_seconds", 0.0)
        kept = self.data.get(key, [])[:seeds]
        self.missing = range(len(kept), seeds)
        self.data.update(settings)
        self.data[key] = kept
        self.data["invocations"] = 1 if earlier is None else self.data.get("invocations", 1) + bool(self.missing)

    def write(self) -> None:
        """Write both files (atomically) with the seconds so far."""
        from concept_influence.fileio import atomic_write_text

        self.data["total_seconds"] = self.earlier_seconds + time.perf_counter() - self.started
        self.paths[0].parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.paths[0], json.dumps(self.data, indent=1))
        atomic_write_text(self.paths[1], self.markdown(self.data))


def seed_statistics(values) -> dict[str, float]:
    """Median, worst (lowest) and spread (max − min) of one quantity over runs."""
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "worst": float(v.min()), "spread": float(v.max() - v.min()), "n": len(v)}


def _removed(results: dict, name: str) -> float | None:
    """The share of the gain removed by the first removal fraction, or None without filter-and-retrain."""
    b = results.get("behaviour")
    if not b or name not in b.get("removal", {}):
        return None
    return next(iter(b["removal"][name].values()))["share_of_gain_removed"]


def format_seeds_table(runs: Mapping[str, dict]) -> str:
    """Markdown: the runs' planting effect and concept check, then per estimator AUROC and share of the gain removed
    (median, worst run, spread) with every run's value."""
    names = list(runs)
    lines = ["| run | planting gain (seed sd) | Welch p | steering, all positions (nats/σ) | prompt positions | verdict |",
             "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        b, c = r.get("behaviour") or {}, r.get("concept_check") or {}
        fo, verdicts = c.get("first_order", {}), c.get("verdicts", {})
        effect = f"{b['effect_size']:.1f}" if b else "—"
        p = f"{b['p_value']:.2g}" if b else "—"
        lines.append(f"| {name} | {effect} | {p} | " + " | ".join(
            f"{fo[k]:+.4f} ({verdicts[k]})" if k in fo else "—" for k in ("all", "prompt")) + f" | {c.get('verdict', '—')} |")
    if all(r.get("behaviour") for r in runs.values()):
        s = seed_statistics([r["behaviour"]["effect_size"] for r in runs.values()])
        lines += ["", f"Planting gain over {s['n']} runs: median {s['median']:.1f}, worst {s['worst']:.1f} seed sd."]
    estimators = list(dict.fromkeys(n for r in runs.values() for n in r["estimators"]))
    lines += ["", "| estimator | AUROC median | worst | spread | gain removed median | worst | spread | AUROC by run | "
              "removed by run |", "|---|---|---|---|---|---|---|---|---|"]
    for est in estimators:
        aurocs = [runs[n]["estimators"][est]["auroc"] for n in names if est in runs[n]["estimators"]]
        removed = [x for x in (_removed(runs[n], est) for n in names) if x is not None]
        a = seed_statistics(aurocs)
        row = f"| {est} | {a['median']:.3f} | {a['worst']:.3f} | {a['spread']:.3f} | "
        if removed:
            g = seed_statistics(removed)
            row += f"{g['median']:.0%} | {g['worst']:.0%} | {g['spread']:.0%} | "
        else:
            row += "— | — | — | "
        row += " / ".join(f"{x:.3f}" for x in aurocs) + " | " + (" / ".join(f"{x:.0%}" for x in removed) or "—") + " |"
        lines.append(row)
    lines += ["", f"Runs, in order: {', '.join(names)}. Worst: the lowest value over the runs; spread: highest − lowest. "
              "Gain removed: the share of the planting gain (planted − clean fine-tune) that removing the top of the "
              "ranking and fine-tuning again removes, mean over fine-tuning seeds."]
    return "\n".join(lines)
