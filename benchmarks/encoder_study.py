"""The row encoder (issue 28, item 2) on designs of the emergent family: how its forward-only codes rank against
exact Concept Influence, the gradient index they are fitted on and the fast path (probe projection), as the training
sample (a share of the pool) and the code length m vary; storage per example; forward-only time against a forward
plus backward, all measured in one run.

Each design is trained as ``bench emergent`` trains it (:func:`emergent_testbed`); exact Concept Influence is EK-FAC
fitted on the pool at the default damping (the family's ``ekfac@0.1|pool|final``); the index has the default settings
(eigen projection, 64 KiB rows in float16). Usage, from the repository root (about 8 minutes on one thread):

    flock /tmp/heavy.lock nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/encoder_study.py --out benchmarks/encoder.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from concept_influence.curvature import CurvatureSettings
from concept_influence.encoder import RowEncoder
from concept_influence.estimators import ConceptInfluence, ProbeProjection
from concept_influence.evaluation import retrieval_metrics
from concept_influence.index import GradientIndex
from concept_influence.provenance import machine_description
from concept_influence.toy.small_model import seed_everything
from concept_influence_benchmarks.emergent_config import EmergentConfig
from concept_influence_benchmarks.emergent_family import design_label, draw_design, emergent_testbed
from concept_influence_benchmarks.pass_costs import cost, floor, train_step_pass

#: (family seed, design index): designs whose probe projection ranked below AUROC 0.8 in benchmarks/family, then
#: two where it did not
DESIGNS = ((0, 4), (0, 8), (1, 3), (1, 6), (1, 8), (1, 11), (2, 2), (2, 4), (0, 7), (2, 0))
SHARES = (0.1, 0.25, 0.5)
#: (m, last block whose maps give the features: None for every indexed block, 0 for the first: half the forward)
CODES = ((16, None), (64, None), (64, 0))
SAMPLE_SEEDS = (0, 1)


def _ranking(scores: np.ndarray, labels: np.ndarray, exact: np.ndarray, held: np.ndarray, index: np.ndarray) -> dict:
    return {"auroc": retrieval_metrics(scores, labels)["auroc"], "spearman": float(spearmanr(scores[held], exact[held])[0]),
            "spearman_index": float(spearmanr(scores[held], index[held])[0])}


def run_design(family: int, number: int, work: Path, n_layers: int = 2) -> dict:
    """Train one design (with ``n_layers`` blocks), score it every way, fit the encoders; the design's entry of the
    results."""
    design = draw_design(number, family)
    cfg = EmergentConfig(**design, n_layers=n_layers)
    seed_everything(cfg.seed)
    started = time.perf_counter()
    bed = emergent_testbed(cfg, work, False, None)
    adapter, pool, labels = bed.adapter, bed.pool, np.asarray(bed.labels)
    bs = cfg.batch_size
    exact_est = ConceptInfluence(bed.concept, fit=CurvatureSettings(batch_size=bs, seed=cfg.seed))
    t0 = time.perf_counter()
    exact = exact_est.score(adapter, pool, batch_size=bs, progress=False).column(0)
    exact_seconds = time.perf_counter() - t0
    query = ConceptInfluence(bed.concept, exact_est.curvature_)
    t0 = time.perf_counter()
    index = GradientIndex.build(work / "index", adapter, pool, exact_est.curvature_, batch_size=bs, progress=False)
    build_seconds = time.perf_counter() - t0
    indexed = index.score(query, adapter, progress=False).column(0)
    fast = ProbeProjection(bed.concept).score(adapter, pool, batch_size=bs, progress=False).column(0)
    every = np.ones(len(pool), bool)
    out = {"design": design, "n_layers": n_layers, "label": design_label(design), "n_pool": len(pool),
           "planted": int(labels.sum()),
           "exact": _ranking(exact, labels, exact, every, indexed), "index": _ranking(indexed, labels, exact, every, indexed),
           "fast_path": _ranking(fast, labels, exact, every, indexed), "index_bytes": index.bytes_per_example,
           "encoders": []}
    position = {e.id: i for i, e in enumerate(pool)}
    encoders = {}
    for share in SHARES:
        for m, last in CODES:
            for seed in SAMPLE_SEEDS if m < round(share * len(pool)) else ():
                t0 = time.perf_counter()
                encoder = RowEncoder.fit(index, adapter, pool, m=m, sample=share, last_block=last, seed=seed,
                                         batch_size=bs, progress=False)
                fit_seconds = time.perf_counter() - t0
                encoders[last] = encoder
                codes = encoder.encode(adapter, pool, batch_size=bs, progress=False)
                scores = encoder.score(query, adapter, codes, progress=False).aligned([e.id for e in pool])[:, 0]
                held = np.ones(len(pool), bool)
                held[[position[i] for i in encoder.info["sample_ids"]]] = False
                out["encoders"].append({"share": share, "m": m, "last_block": last, "seed": seed,
                                        "bytes": codes.bytes_per_example, "fit_seconds": fit_seconds,
                                        **_ranking(scores, labels, exact, held, indexed)})
    passes = {f"encode{'' if last is None else f' (blocks 0..{last})'}":
              lambda e=e: e.encode(adapter, pool, batch_size=bs, progress=False) for last, e in encoders.items()}
    passes.update({"fast_path": lambda: ProbeProjection(bed.concept).score(adapter, pool, batch_size=bs, progress=False),
                   "floor": lambda: floor(adapter, pool, bs),
                   "forward_backward": lambda: train_step_pass(adapter, pool, bs)})
    out["cost_per_example"] = {k: {unit: v / len(pool) for unit, v in cost(run).items()} for k, run in passes.items()}
    out["cost_per_example"]["index_build"] = {"seconds": build_seconds / len(pool)}
    out["cost_per_example"]["exact_with_fit"] = {"seconds": exact_seconds / len(pool)}
    out["seconds"] = time.perf_counter() - started
    return out


def _stats(values, worst=np.min) -> str:
    """``median / worst / spread`` (worst: the lowest, or ``np.max`` for a cost)."""
    v = np.asarray(values, float)
    return f"{np.median(v):.3f} / {worst(v):.3f} / {v.max() - v.min():.3f}"


def _name(share: float, m: int, last_block: int | None) -> str:
    return f"{share:.0%} m{m}" + ("" if last_block is None else f" blocks 0..{last_block}")


def _mean(entries: list[dict], key: str) -> float:
    return float(np.mean([e[key] for e in entries]))


def report(results: dict) -> str:
    """The study as markdown: per design (encoders averaged over the sample seeds), then per (share, m) over every
    design and seed, then the cost of each pass."""
    runs = results["designs"]
    hard = [r for r in runs if r["fast_path"]["auroc"] < 0.8]
    m = results["machine"]
    depth = runs[0].get("n_layers", 2)
    lines = [f"# The row encoder on the emergent family (issue 28, item 2){'' if depth == 2 else f': {depth} blocks'}",
             "",
             f"Command: `{results['command']}` ({results['seconds']:.0f} s on {m['cpu']}, torch threads "
             f"{m['torch_threads']}, load average at start {m['load_average_start'][0]:.1f}).", "",
             f"Encoders are fitted on {len(SAMPLE_SEEDS)} random samples (seeds {SAMPLE_SEEDS}) per share of the pool and "
             "code length m. Encoder Spearman is with exact Concept Influence on the pool examples outside the "
             "encoder's sample; AUROC is on the whole pool against the planted labels; index and fast path on the "
             "whole pool.", "", "## Per design (encoders: mean over the samples)", "",
             "| design | pool | exact AUROC | index AUROC / Spearman | fast path AUROC / Spearman | "
             + " | ".join(f"encoder {_name(s, m_, b)} AUROC / Spearman" for s in SHARES for m_, b in CODES) + " |",
             "|---|---|---|---|---|" + "---|" * (len(SHARES) * len(CODES))]
    for r in runs:
        cells = []
        for s in SHARES:
            for m_, b in CODES:
                fits = [e for e in r["encoders"] if (e["share"], e["m"], e["last_block"]) == (s, m_, b)]
                cells.append(f"{_mean(fits, 'auroc'):.3f} / {_mean(fits, 'spearman'):.2f}" if fits else "-")
        lines.append(f"| {r['label']} | {r['n_pool']} | {r['exact']['auroc']:.3f} | {r['index']['auroc']:.3f} / "
                     f"{r['index']['spearman']:.2f} | {r['fast_path']['auroc']:.3f} / {r['fast_path']['spearman']:.2f} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"## Over designs and samples: median / worst / spread ({len(hard)} of {len(runs)} designs have "
              "fast-path AUROC < 0.8: the goal's designs)", "",
              "| ranking | AUROC − exact AUROC | Spearman with exact | Spearman with the index | goal met: AUROC ≥ exact − "
              "0.02 where fast path < 0.8 | bytes / example |", "|---|---|---|---|---|---|"]

    def row(name, entries, size):
        gaps = [e["auroc"] - r["exact"]["auroc"] for r, e in entries]
        goal = [e["auroc"] >= r["exact"]["auroc"] - 0.02 for r, e in entries if r["fast_path"]["auroc"] < 0.8]
        lines.append(f"| {name} | {_stats(gaps)} | {_stats([e['spearman'] for _, e in entries])} | "
                     f"{_stats([e['spearman_index'] for _, e in entries])} | {sum(goal)}/{len(goal)} | {size} |")

    row("index (default)", [(r, r["index"]) for r in runs], runs[0]["index_bytes"])
    row("fast path", [(r, r["fast_path"]) for r in runs], "- (recomputed)")
    for s in SHARES:
        for m_, b in CODES:
            entries = [(r, e) for r in runs for e in r["encoders"] if (e["share"], e["m"], e["last_block"]) == (s, m_, b)]
            if {id(r) for r, _ in entries} == {id(r) for r in runs}:
                row(f"encoder {_name(s, m_, b)}", entries, entries[0][1]["bytes"])
    misses = [(r, e) for r in hard for e in r["encoders"] if e["auroc"] < r["exact"]["auroc"] - 0.02]
    lines += ["", f"Fits that miss the goal ({len(misses)} of {sum(len(r['encoders']) for r in hard)} on the goal's designs):",
              ""] + [f"- {r['label']}: exact {r['exact']['auroc']:.3f}, index {r['index']['auroc']:.3f}, encoder "
                     f"{_name(e['share'], e['m'], e['last_block'])} seed {e['seed']}: {e['auroc']:.3f} (Spearman "
                     f"{e['spearman']:.2f})" for r, e in misses]
    cost = [r["cost_per_example"] for r in runs]
    lines += ["", "## Cost per example (one thread; median / worst (highest) / spread over designs)", "",
              "`floor`: a forward and a backward to the activations only; `forward_backward`: with the weights' "
              "gradients, as training; `encode`: the encoder's forward (stopped after the last indexed block, or "
              "after block 0), features and code; `index_build`: the index's pass (one run, not best of 3).", "",
              "| pass | ms | × floor (time) | × forward+backward (time) | MFLOP | × floor (FLOPs) |", "|---|---|---|---|---|---|"]
    for k in cost[0]:
        if k == "exact_with_fit":
            continue
        sec = [c[k]["seconds"] for c in cost]
        cells = [_stats(np.array(sec) * 1e3, np.max), _stats([a / c["floor"]["seconds"] for a, c in zip(sec, cost)], np.max),
                 _stats([a / c["forward_backward"]["seconds"] for a, c in zip(sec, cost)], np.max)]
        if "flops" in cost[0][k]:
            flops = [c[k]["flops"] for c in cost]
            cells += [_stats(np.array(flops) / 1e6, np.max),
                      _stats([a / c["floor"]["flops"] for a, c in zip(flops, cost)], np.max)]
        else:
            cells += ["-", "-"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    fits = [e["fit_seconds"] for r in runs for e in r["encoders"]]
    lines += ["", f"Encoder fit (the sample's forward, the rows' SVD, the ridge): {np.median(fits):.2f} s median, "
              f"{max(fits):.2f} s worst."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/encoder.md")
    parser.add_argument("--designs", type=int, default=len(DESIGNS), help="the first N of the designs")
    parser.add_argument("--n-layers", type=int, default=2, help="blocks of every design's model (default 2, as the "
                                                                "family; the concept is read after the last)")
    parser.add_argument("--report-only", action="store_true", help="write the markdown again from the .json beside it")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        out.write_text(report(json.loads(out.with_suffix(".json").read_text())))
        return
    started = time.perf_counter()
    torch.set_num_threads(1)
    designs = []
    for family, number in DESIGNS[: args.designs]:
        with tempfile.TemporaryDirectory() as work:
            designs.append(run_design(family, number, Path(work), args.n_layers))
        print(f"{designs[-1]['label']}: {designs[-1]['seconds']:.0f} s", flush=True)
    command = f"python benchmarks/encoder_study.py --out {args.out}" + (
        f" --designs {args.designs}" if args.designs != len(DESIGNS) else "") + (
        f" --n-layers {args.n_layers}" if args.n_layers != 2 else "")
    results = {"command": command, "machine": machine_description(),
               "seconds": time.perf_counter() - started, "designs": designs}
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.write_text(report(results))


if __name__ == "__main__":
    main()
