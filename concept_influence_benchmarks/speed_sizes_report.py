"""The size benchmark's report (:mod:`.speed_sizes`): a markdown table with every stage against the floor, memory
alone in a process, and the compared libraries against ours in seconds."""

from __future__ import annotations

from .speed_size_stages import SizeConfig

__all__ = ["format_size_markdown"]


_LABELS = {
    "floor": "**floor**: forward + backward to the activations only",
    "train_step": "training step (forward, backward, AdamW)",
    "ekfac_fit": "EK-FAC fit (2 passes + eigendecompositions)",
    "probe_projection": "probe_projection (forward to the concept's block)",
}
_LIBRARIES = {"kronfluence": "kronfluence 1.0.1, K = {k} (fit + {runs})",
              "bergson": "Bergson 2.5.1, K = {k} (label sampling + fit + score)"}


def _label(name: str, cfg: dict) -> str:
    if name in _LABELS:
        return _LABELS[name]
    library, _, k = name.rpartition("_k")
    if library in _LIBRARIES:
        return _LIBRARIES[library].format(k=k, runs="score" if k == "1" else f"{k} scoring runs")
    k = name.removeprefix("concept_influence_k").removesuffix("_lowrank")
    rank = f"query rank {cfg['query_rank']}" if name.endswith("_lowrank") else "full-rank query"
    return f"Concept Influence scoring, K = {k}, {rank}"


def format_size_markdown(report: dict) -> str:
    """The size benchmark as a markdown table with ratios to the floor."""
    cfg, st, m = report["config"], report["stages"], report["machine"]
    floor = st["floor"]
    command = f"concept-influence bench speed --size {cfg['size']} --out benchmarks"
    defaults = SizeConfig()
    command += "".join(f" --{flag} {cfg[key]}" for flag, key in (("examples", "n_examples"), ("rounds", "rounds"))
                       if cfg[key] != getattr(defaults, key)) + ("" if cfg["kronfluence"] else " --no-kronfluence")
    lines = [
        f"# Speed at {cfg['size']} size", "",
        f"Reproduce: `{command}` ({report['total_seconds']:.0f} s in all).", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {cfg['threads']} threads, "
        f"kronfluence {m.get('kronfluence') or 'not installed'}, Bergson {m.get('bergson') or 'not installed'}; float32 on "
        "CPU.", "",
        f"Model: a randomly initialised bias-free Llama of {cfg['size']} shape ({report['parameters'] / 1e6:.0f} M parameters: "
        + ", ".join(f"{k} {v}" for k, v in report["shape"].items()) + f"). {cfg['n_examples']} random sequences of "
        f"{cfg['seq_len']} tokens (response: the second half), batch size {cfg['batch_size']}; concepts: random directions "
        f"at `blocks.{cfg['concept_layer']}.hook_resid_post`, {report['tracked_maps']} tracked weight matrices (blocks "
        f"0..{cfg['concept_layer']}), {cfg['n_eval']} evaluation examples. Each stage once, in this order"
        + (f", then the compared K = 1 pipelines (our fit and scoring, kronfluence's, Bergson's; marked †) "
           f"{cfg['rounds'] - 1} more times in alternating order, their median reported" if cfg["rounds"] > 1 else "")
        + "; FLOPs counted by "
        "torch's FlopCounterMode on one batch (matrix products and attention, not eigendecompositions); peak RSS with "
        "VmHWM reset before the stage, and its rise over the RSS before it. The peak is the whole process's, with what "
        "earlier stages left behind (model copies, factors); compare stages by the rise.", "",
        "Concept Influence rows are per-example scoring with the preconditioned queries already computed; computing them "
        "(K backward passes over the evaluation examples, the preconditioning and the SVD of the low-rank query) is a "
        "fixed cost per concept set, in its own column.", "",
        "| stage | s / example | × floor | GFLOP / example | FLOP × floor | peak RSS (MiB) | rise (MiB) | Spearman | "
        "queries (s, once) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, entry in st.items():
        rho = entry.get("spearman_vs_full_rank", entry.get("spearman_vs_ours"))
        rho = "" if rho is None else (f"{rho:.4f} vs ours" if "spearman_vs_ours" in entry else f"{rho:.4f} vs full rank")
        memory = (f"{entry['peak_mib']:.0f} | {entry['rise_mib']:.0f}" if "peak_mib" in entry else "n/a | n/a")
        queries = f"{entry['query_seconds']:.1f}" if "query_seconds" in entry else ""
        mark = " †" if len(entry.get("all_seconds", ())) > 1 else ""
        lines.append(f"| {_label(name, cfg)}{mark} | {entry['seconds_per_example']:.3f} | "
                     f"{entry['seconds_per_example'] / floor['seconds_per_example']:.2f} | "
                     f"{entry['flops_per_example'] / 1e9:.1f} | {entry['flops_per_example'] / floor['flops_per_example']:.2f} | "
                     f"{memory} | {rho} | {queries} |")
    own = report.get("own_process_memory") or {}
    if own:
        lines += ["", f"Peak memory of each compared stage alone in a fresh process (model and data loaded, the libraries "
                  f"imported, and for scoring the factors fitted, before the peak is reset), on {cfg['memory_examples']} "
                  "examples:", "", "| stage | peak RSS (MiB) | rise (MiB) |", "| --- | ---: | ---: |"]
        lines += [f"| {_label(name, cfg)} | {m['peak_mib']:.0f} | {m['rise_mib']:.0f} |" for name, m in own.items()
                  if m.get("peak_mib") is not None]
    lines += _comparison_lines(st, cfg["many_concepts"])
    if report.get("bergson") and "bergson_k1" not in st:
        lines += ["", f"Bergson: not run: {report['bergson']}."]
    return "\n".join(lines) + "\n"


def _comparison_lines(st: dict, many: int) -> list[str]:
    """Each library against ours in seconds: at K = 1 the medians (with every run), fit and scoring with its query;
    at K = ``many`` the scoring with its queries (the fit does not depend on K)."""
    if "concept_influence_k1" not in st:
        return []
    lines = []
    ours_fit, ours_score, ours_query = (st["ekfac_fit"]["seconds"], st["concept_influence_k1"]["seconds"],
                                        st["concept_influence_k1"]["query_seconds"])
    ours_total = ours_fit + ours_score + ours_query
    for library, label in (("kronfluence", "kronfluence"), ("bergson", "Bergson")):
        other = st.get(f"{library}_k1")
        if other is None:
            continue
        runs = ", ".join(f"{x:.1f}" for x in other.get("all_seconds", [other["seconds"]]))
        ours_runs = ", ".join(f"{f + s + ours_query:.1f}" for f, s in
                              zip(st["ekfac_fit"].get("all_seconds", [ours_fit]),
                                  st["concept_influence_k1"].get("all_seconds", [ours_score])))
        lines += ["", f"{label}, K = 1: fit {other['fit_seconds']:.1f} s and score {other['score_seconds']:.1f} s (its "
                  f"query included), {other['seconds']:.1f} s in all (runs: {runs}), against ours {ours_fit:.1f} s, "
                  f"{ours_score:.1f} s and {ours_query:.1f} s for the query, {ours_total:.1f} s in all (runs: "
                  f"{ours_runs}). {label} / ours: fit {other['fit_seconds'] / ours_fit:.2f}×, scoring with its query "
                  f"{other['score_seconds'] / (ours_score + ours_query):.2f}×, in all {other['seconds'] / ours_total:.2f}×."]
        other_many, ours_many = st.get(f"{library}_k{many}"), st.get(f"concept_influence_k{many}")
        if other_many is not None and ours_many is not None:
            ours_scoring = ours_many["seconds"] + ours_many["query_seconds"]
            lines += ["", f"{label}, K = {many}: fit {other_many['fit_seconds']:.1f} s and score "
                      f"{other_many['score_seconds']:.1f} s (its queries included), against ours {ours_many['seconds']:.1f} s "
                      f"and {ours_many['query_seconds']:.1f} s for the queries ({label} / ours, scoring with its queries: "
                      f"{other_many['score_seconds'] / ours_scoring:.2f}×)."]
    return lines
