"""The index benchmark's markdown: size, build, accuracy and query time at a real shape, the demo study, and ours
beside Bergson's index; and the medical part's own report."""

from __future__ import annotations

import numpy as np

from .index_bench_config import IndexBenchConfig
from .index_bench_demo import median_rows
from .seeds import seed_statistics

__all__ = ["format_index_markdown", "format_medical_markdown"]

QUERIES = (("concept_influence", "Concept Influence"), ("influence_function", "classic influence"))


def _rho(values: list[float]) -> str:
    return f"{np.median(values):.3f} (min {min(values):.3f})" if len(values) > 1 else f"{values[0]:.3f}"


def _command(cfg: dict) -> str:
    command = "concept-influence bench index --out benchmarks"
    if cfg["quick"]:
        return command + " --quick"
    return command + (f" --examples {cfg['n_examples']}" if cfg["n_examples"] != IndexBenchConfig.n_examples else "") \
        + _seeds_option(cfg) + ("" if cfg["bergson"] else " --no-bergson")


def _seeds_option(cfg: dict) -> str:
    """``--seeds N`` when the report's number of seeds is not the default."""
    return f" --seeds {cfg['seeds']}" if cfg["seeds"] != IndexBenchConfig.seeds else ""


def _size_section(r: dict) -> list[str]:
    cfg, s = r["config"], r["size"]
    full = 4 * s["tracked_parameters"]
    lines = [f"## At {cfg['size']} shape (random weights)", "",
             f"A randomly initialised bias-free Llama of {cfg['size']} shape ({s['parameters'] / 1e6:.0f} M parameters), "
             f"{cfg['n_examples']} random sequences of {cfg['seq_len']} tokens (response: the second half), "
             f"{cfg['n_concepts']} random concept directions at `blocks.{cfg['concept_layer']}.hook_resid_post` read on "
             f"{cfg['n_eval']} evaluation sequences, classic influence on {cfg['n_test']} test sequences; the index and "
             f"both exact estimators track the {s['tracked_maps']} weight matrices of blocks 0..{cfg['concept_layer']} "
             f"({s['tracked_parameters'] / 1e6:.1f} M parameters: {full / 1e6:.0f} MB of float32 gradient per example). "
             f"EK-FAC fit: {s['fit_seconds']:.0f} s; one exact scoring pass (Concept Influence, the {cfg['n_concepts']} "
             f"concepts in one pass, queries computed beforehand): {s['exact_pass_seconds']:.1f} s; classic influence: "
             f"{s['exact_influence_function_seconds']:.1f} s. Default size: the largest rank whose float16 row fits in "
             f"{cfg['budget']} bytes; over all {s['all_maps']} weight matrices of the model ({4 * s['all_parameters'] / 1e6:.0f} "
             f"MB of float32 gradient) that is rank {s['all_maps_rank']}, {s['all_maps_bytes']} bytes per example "
             f"({4 * s['all_parameters'] / s['all_maps_bytes']:.0f}× smaller).", "",
             "| index | rank | dtype | bytes / example | × smaller | build (s) | build / exact pass | Spearman, Concept "
             "Influence (median over concepts) | Spearman, classic influence |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = {f"ours, {label}": v for label, v in s["variants"].items()}
    if "bergson" in s:
        rows["Bergson 2.5.1 (random, its autocorrelation Hessian)"] = s["bergson"]
    for label, v in rows.items():
        build = v["build_seconds"] + v.get("hessian_seconds", 0.0)
        extra = f" ({v['hessian_seconds']:.1f} + {v['build_seconds']:.1f})" if "hessian_seconds" in v else ""
        lines.append(f"| {label} | {v['rank']} | {v['dtype']} | {v['bytes']} | {full / v['bytes']:.0f} | {build:.1f}{extra} | "
                     f"{build / s['exact_pass_seconds']:.2f} | {_rho(v['spearman_concept_influence'])} | "
                     f"{_rho(v['spearman_influence_function'])} |")
    return lines


def _query_section(r: dict) -> list[str]:
    cfg, s, q = r["config"], r["size"], r["size"]["query_costs"]
    many = cfg["many"]
    bergson = {(b["rows"], b["k"]): b for b in s.get("bergson", {}).get("streamed", [])}
    lines = ["", "### Query time", "",
             f"The query's own costs on the model: its gradient on the {cfg['n_eval']} evaluation sequences "
             f"{q['gradient_seconds_k1']:.1f} s for K = 1 and {q[f'gradient_seconds_k{many}']:.1f} s for K = "
             f"{cfg['many']}; projecting and preconditioning it in the default index's spaces "
             f"{q['precondition_seconds_k1']:.2f} s and {q[f'precondition_seconds_k{many}']:.2f} s. The product "
             "with every stored row, streamed over the shards (synthetic rows of the default layout), with the page "
             "cache dropped first (cold) and then again (warm); a new concept costs the three together. Bergson: its "
             "`Attributor` loading the rows into memory and searching (the same synthetic rows, its layout, float32).",
             "", "| rows | K | GB on disk | ours cold (s) | ours warm (s) | a new concept, warm (s) | Bergson cold (s) | "
             "Bergson warm (s) |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in r["streamed"]:
        k = t["k"]
        total = q[f"gradient_seconds_k{k}"] + q[f"precondition_seconds_k{k}"] + t["warm_seconds"]
        b = bergson.get((t["rows"], k))
        theirs = f"{b['cold_seconds']:.1f} | {b['warm_seconds']:.1f}" if b else "— | —"
        lines.append(f"| {t['rows']} | {k} | {t['gigabytes']:.2f} | {t['cold_seconds']:.1f} | {t['warm_seconds']:.1f} | "
                     f"{total:.1f} | {theirs} |")
    return lines


def _rows_table(seeds: list[dict]) -> list[str]:
    """The table of every index against the exact estimators: medians over ``seeds`` (their ``rows``)."""
    full = seeds[0]["full_bytes"]
    lines = ["| index | curvature | bytes / example | × smaller | Spearman, Concept Influence | AUROC (exact) | "
             "Spearman, classic influence | AUROC (exact) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = {(m.variant, m.curvature, m.query): m for m in median_rows(seeds, "rows", ("variant", "curvature", "query"))}
    for variant, curvature in dict.fromkeys((v, c) for v, c, _ in rows):
        ci, inf = rows[(variant, curvature, "concept_influence")], rows[(variant, curvature, "influence_function")]
        lines.append(f"| {variant} | {curvature} | {ci.bytes} | {full / ci.bytes:.0f} | {ci.spearman:.3f} | "
                     f"{ci.auroc:.3f} ({ci.exact_auroc:.3f}) | {inf.spearman:.3f} | {inf.auroc:.3f} ({inf.exact_auroc:.3f}) |")
    return lines


def _default_by_seed(seeds: list[dict]) -> list[str]:
    """The default index's headline over ``seeds``: Spearman and the AUROC against the exact estimator's as median,
    worst and spread, and every seed's value."""
    parts = []
    for query, name in QUERIES:
        rows = [next(r for r in s["rows"] if (r["variant"], r["curvature"], r["query"]) == ("default", "ekfac", query))
                for s in seeds]
        rho = [r["spearman"] for r in rows]
        gap = [r["auroc"] - r["exact_auroc"] for r in rows]
        a, g = seed_statistics(rho), seed_statistics(gap)
        parts.append(f"{name}: Spearman median {a['median']:.3f}, worst {a['worst']:.3f}, spread {a['spread']:.3f} "
                     f"({' / '.join(f'{x:.3f}' for x in rho)}); AUROC minus the exact estimator's median "
                     f"{g['median']:+.3f}, worst {g['worst']:+.3f}, spread {g['spread']:.3f} "
                     f"({' / '.join(f'{x:+.3f}' for x in gap)})")
    return ["", f"The default index over {len(seeds)} seeds (by seed in brackets; worst: the lowest): "
            + "; ".join(parts) + "."]


def _demo_section(r: dict) -> list[str]:
    demo = r["demo"]
    full = demo[0]["full_bytes"]
    lines = ["", "## The demo", "",
             f"The demo's model, data and concept (`concept-influence demo` sizes; {len(demo)} seeds; pool of "
             f"{demo[0]['n_pool']} with {demo[0]['n_planted']} planted), the EK-FAC fitted on the pool over every "
             f"weight matrix ({full} bytes of float32 gradient per example). Each index stores float16 rows; medians over "
             "seeds of the Spearman correlation with the exact estimator's scores and of the planted AUROC (the exact "
             "estimator's in brackets). `empirical`: the same rows preconditioned with their own damped second moment "
             "(as LoGra and Bergson do) instead of the EK-FAC restricted to the subspace.", ""] + _rows_table(demo)
    lines += _default_by_seed(demo)
    ck = [d["checkpoints"] for d in demo]
    lines += ["", "Summed over the pre-trained and the fine-tuned model (one index of both checkpoints at the default size, "
              "against `OverCheckpoints` of exact Concept Influence): Spearman "
              f"{np.median([c['spearman'] for c in ck]):.3f}, AUROC {np.median([c['auroc'] for c in ck]):.3f} (exact "
              f"{np.median([c['exact_auroc'] for c in ck]):.3f}); by seed "
              + ", ".join(f"{c['spearman']:.3f} / {c['auroc']:.3f} ({c['exact_auroc']:.3f})" for c in ck) + "."]
    if demo[0].get("bergson"):
        lines += ["", "### Ours beside Bergson's index, equal bytes and precision", "",
                  "A Llama of the demo's size (bias-free maps Bergson tracks as we do) trained the same way; both store "
                  "float32 rows of rank r per side; ours is the eigen projection with the EK-FAC in the subspace, "
                  "Bergson's its random projection with its autocorrelation Hessian. Medians over seeds.", "",
                  "| rank | bytes / example | query | ours: Spearman / AUROC | Bergson: Spearman / AUROC | exact AUROC |",
                  "| ---: | ---: | --- | ---: | ---: | ---: |"]
        rows = {(m.rank, m.query, m.library): m for m in median_rows(demo, "bergson", ("rank", "query", "library"))}
        for rank, query in dict.fromkeys((k, q) for k, q, _ in rows):
            ours, theirs = rows[(rank, query, "ours (eigen, EK-FAC)")], rows[(rank, query, "Bergson 2.5.1")]
            lines.append(f"| {rank} | {ours.bytes} | {query} | {ours.spearman:.3f} / {ours.auroc:.3f} | "
                         f"{theirs.spearman:.3f} / {theirs.auroc:.3f} | {ours.exact_auroc:.3f} |")
    return lines


def _machine(report: dict, extra: str = "") -> str:
    m = report["machine"]
    return (f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} thread(s){extra}; "
            "float32 models on CPU. " + ("Every time is from this one run." if report.get("invocations", 1) == 1 else
                                         f"Made in {report['invocations']} runs on this machine, each adding seeds to "
                                         "the report before it (a seed's figures are from one run)."))


def format_index_markdown(report: dict) -> str:
    """The benchmark as markdown: the command, the machine, and the three sections' tables."""
    m, cfg = report["machine"], report["config"]
    bergson = f", Bergson {m.get('bergson') or 'not installed'}" + (f" ({report['bergson']})" if report.get("bergson")
                                                                     else "")
    lines = ["# Gradient index benchmark", "", f"Reproduce: `{_command(cfg)}` ({report['total_seconds']:.0f} s in all).",
             "", _machine(report, bergson), ""]
    lines += _size_section(report) + _query_section(report) + (_demo_section(report) if report["demo"] else [])
    return "\n".join(lines) + "\n"


def _medical_command(report: dict) -> str:
    cfg = report["config"]
    command = f"concept-influence bench index --part medical --data {report['data']} --out benchmarks"
    return command + (" --quick" if cfg["quick"] else _seeds_option(cfg))


def format_medical_markdown(report: dict) -> str:
    """``bench index --part medical`` as markdown: the command, the machine, the data and model, and the table."""
    p, seeds = report["planted_config"], report["medical"]
    layer = p["n_layers"] - 1 if p["layer"] is None else p["layer"]
    lines = ["# Gradient index benchmark on the medical data", "",
             f"Reproduce: `{_medical_command(report)}` ({report['total_seconds']:.0f} s in all).", "", _machine(report), "",
             f"Data: {' + '.join(report['files'])} (paired) as `concept-influence bench medical --rate {p['rate']}"
             f"{' --quick' if report['config']['quick'] else ''}` splits them; pool of {seeds[0]['n_pool']} with "
             f"{seeds[0]['n_planted']} planted (seed 0), pre-train {p['n_pretrain']} clean chats, probe {p['n_probe']} "
             f"per class, eval {p['n_eval']}; {len(seeds)} seed(s).", "",
             f"Model: as that benchmark trains it: TransformerLens, {p['n_layers']} blocks, d_model {p['d_model']}, vocab "
             f"{p['vocab_size']}; pre-train {p['pretrain_epochs']} epochs, fine-tune on the pool {p['finetune_epochs']} "
             f"epochs. Concept: {p['probe_kind']} probe at `blocks.{layer}.hook_resid_post` read at {p['query']} of the "
             f"model's own answers to the evaluation prompts; classic influence on up to {p['n_test']} planted answers to "
             "held-out prompts. The EK-FAC fitted on the pool over every weight matrix "
             f"({seeds[0]['full_bytes']} bytes of float32 gradient per example).", "",
             "Each index stores float16 rows; medians over seeds of the Spearman correlation with the exact estimator's "
             "scores and of the planted AUROC (the exact estimator's in brackets). `empirical`: the same rows "
             "preconditioned with their own damped second moment instead of the EK-FAC restricted to the subspace.", ""]
    return "\n".join(lines + _rows_table(seeds) + _default_by_seed(seeds)) + "\n"
