"""The planted benchmark's outputs: results.json, results.md, the plots and the retrieval table."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_text
from ..plots import plot_behaviour_removal, plot_fast_vs_full, plot_pr_curves, plot_score_histograms

__all__ = ["format_retrieval", "format_report", "command_line", "report_plots", "write_results"]

CONCEPT_ESTIMATORS = ("concept_influence", "concept_grad_dot", "probe_projection", "projection_difference")


def report_plots(out: Path, scores: dict[str, np.ndarray], labels: list[int], results: dict) -> dict[str, str]:
    """The run's plots in ``out`` (precision-recall, score histograms, fast vs full, and behaviour after removal when
    measured); returns their file names by kind."""
    plots = {"pr_curves": plot_pr_curves(scores, labels, out / "pr_curves.png"),
             "score_histograms": plot_score_histograms(scores, labels, out / "score_histograms.png")}
    fast = {k: scores[k] for k in ("probe_projection", "projection_difference") if k in scores}
    if fast and "concept_influence" in scores:  # a run may score only some estimators (PlantedConfig.estimators)
        plots["fast_vs_full"] = plot_fast_vs_full(("concept_influence", scores["concept_influence"]), fast, labels,
                                                  out / "fast_vs_full.png")
    b = results.get("behaviour")
    if b:
        points = {name: {float(f): r["behaviour"] for f, r in by_f.items()} for name, by_f in b["removal"].items()}
        plots["behaviour_removal"] = plot_behaviour_removal(points, b["clean"], b["planted"],
                                                            out / "behaviour_removal.png", ylabel=b["metric"])
    return {k: p.name for k, p in plots.items()}


def write_results(out: Path, results: dict) -> None:
    """``out/results.json`` and ``out/results.md``."""
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(out / "results.md", format_report(results))


def format_retrieval(results: dict) -> str:
    """The estimators' retrieval metrics as a fixed-width table."""
    width = max(30, *(len(name) for name in results["estimators"]))
    head = f"{'estimator':<{width}} {'AUROC':>6} {'AUPRC':>6} {'P@k':>6} {'s/1k ex':>8}"
    rows = [head, "-" * len(head)]
    for name, m in results["estimators"].items():
        rows.append(f"{name:<{width}} {m['auroc']:>6.3f} {m['auprc']:>6.3f} {m['precision_at_k']:>6.3f} "
                    f"{m['seconds_per_1k']:>8.2f}")
    return "\n".join(rows)


def report_header(title: str, results: dict) -> list[str]:
    """A benchmark report's first lines: its title, the command that made it, the machine and the time taken."""
    command = [f"Command: `{results['command']}`", ""] if results.get("command") else []
    return [f"# {title}", "", *command, machine_line(results), ""]


def machine_line(results: dict) -> str:
    """The machine a benchmark ran on and how long it took."""
    m = results["machine"]
    machine = (f"{m['cpu']}, {m['usable_cores']} cores, torch {m['torch']} on {m['torch_threads']} thread(s), "
               f"Python {m['python']}, load average {m['load_average_start'][0]:.1f} at the start")
    return f"Machine: {machine}" + (f"; {results['total_seconds'] / 60:.1f} min in all" if "total_seconds" in results
                                    else " (run in progress)")


def _model_line(cfg: dict) -> str:
    """The model and its training, in one sentence: the small model trained here, or LoRA fine-tunes of the user's."""
    if not cfg.get("model"):
        return (f"TransformerLens, {cfg['n_layers']} blocks, d_model {cfg['d_model']}, vocab {cfg['vocab_size']}; "
                f"pre-train {cfg['pretrain_epochs']} epochs, fine-tune {cfg['finetune_epochs']} epochs.")
    targets = ", ".join(cfg["lora_targets"]) or "every linear map of the blocks"
    return (f"`{cfg['model']}` ({cfg['n_layers']} blocks, d_model {cfg['d_model']}, {cfg['dtype']} on {cfg['device']}), "
            f"not pre-trained here; every fine-tune ({cfg['finetune_epochs']} epochs, lr {cfg['finetune_lr']}) trains "
            f"fresh LoRA adapters of rank {cfg['lora_rank']} on {targets}.")


def format_report(results: dict) -> str:
    """``results.md``: what ran, whether planting raised the behaviour, retrieval, filter-and-retrain, LDS."""
    cfg, sp = results["config"], results["splits"]
    lines = report_header("Planted-data benchmark", results) + [
              f"Data: {' + '.join(results['data'])} ({'paired' if cfg['paired'] else 'unpaired'}); rate {cfg['rate']}; "
              f"pool {sp['pool']} ({sp['planted']} planted), pre-train {sp['pretrain']}, probe {sp['probe']} per class, "
              f"eval {sp['eval']}; seed {cfg['seed']}.", "",
              f"Model: {_model_line(cfg)} "
              f"{cfg.get('probe_kind', 'logistic')} probe at `{results['probe']['hook_name']}`: held-out accuracy "
              f"{results['probe']['accuracy']:.3f}, "
              f"AUROC {results['probe']['roc_auc']:.3f}. EK-FAC fit {results['ekfac_fit_seconds']:.1f} s; "
              f"one fine-tune {results['finetune_seconds']:.1f} s.", ""]
    b = results.get("behaviour")
    if b:
        verdict = ("**Planting raised the behaviour**" if b["raised"] else
                   "**Planting did NOT raise the behaviour** measurably, so the removal numbers below do not show "
                   "causation; the retrieval table only says whether a ranking recovers the planted labels")
        lines += ["## Behaviour", "",
                  f"Metric: {b['metric']} on the evaluation prompts, over {len(b['clean'])} fine-tuning seeds.", "",
                  f"- clean fine-tune: {np.mean(b['clean']):.4f} ± {np.std(b['clean']):.4f}",
                  f"- planted fine-tune: {np.mean(b['planted']):.4f} ± {np.std(b['planted']):.4f}",
                  f"- gain {b['gain']:.4f} = {b['effect_size']:.1f} × the seeds' sd (one-sided Welch p = {b['p_value']:.2g})",
                  "", verdict + ".", ""]
    elif not cfg.get("retrain", True):
        lines += ["Behaviour and filter-and-retrain were not run (`--no-retrain`).", ""]
    lines += concept_lines(results)
    fractions = [str(f) for f in cfg["remove_fractions"]]
    head = "| estimator | AUROC | AUPRC | P@k | s/1k ex |"
    sep = "|---|---|---|---|---|"
    if b:
        for f in fractions:
            head += f" gain removed (top {float(f):.0%}) |"
            sep += "---|"
    lines += ["## Retrieval and filter-and-retrain", "", head, sep]
    for name, m in results["estimators"].items():
        row = f"| {name} | {m['auroc']:.3f} | {m['auprc']:.3f} | {m['precision_at_k']:.3f} | {m['seconds_per_1k']:.2f} |"
        if b:
            for f in fractions:
                r = b["removal"][name][f]
                share = f"{r['share_of_gain_removed']:.0%} ± {r['share_sd']:.0%}" if b["raised"] else "n/a"
                row += f" {share} ({r['planted_removed']} planted) |"
        lines.append(row)
    lines += ["", "P@k: precision among the top k = number planted."
              + (" `[checkpoints]`: the estimator summed over the pre-trained and the fine-tuned model (OverCheckpoints); "
                 "its time includes an EK-FAC fit at each." if any(n.endswith("[checkpoints]") for n in results["estimators"])
                 else "")
              + (" Gain removed: (planted − after removal) / (planted − clean), mean ± sd over seeds (n/a when planting "
                 "did not raise the behaviour; the values are in results.json); in brackets the planted examples among "
                 "those removed." if b else ""), ""]
    if "lds" in results:
        lds = results["lds"]
        ceiling = lds.get("ceiling", float("nan"))
        share = lds.get("fraction", 0.5)
        subsets = "halves" if share == 0.5 else f"subsets of {share:.0%}"
        lines += ["## Concept-LDS", "", f"{lds['subsets']} random {subsets} of the pool, each fine-tuned with "
                  f"{lds.get('seeds', 1)} seed(s); Spearman between the summed scores of the kept examples and the "
                  "concept measured after fine-tuning on them (mean over the seeds). Only the concept estimators predict "
                  "this quantity; the others are shown for reference.", "",
                  f"**Ceiling: {ceiling:.3f}**, the Spearman between "
                  + ("two fine-tuning seeds on the same subsets: what a perfect estimator could reach against one "
                     "seed's measurement." if lds.get("seeds", 2) < 4 else
                     f"the means of two disjoint halves of the {lds['seeds']} seeds on the same subsets: what a perfect "
                     "estimator could reach against a measurement averaged over half the seeds.")
                  + (" Below 0.5, the subsets' measured concept is mostly seed noise at this M and subset size, and no "
                     "estimator's value can be read." if not ceiling >= 0.5 else "")
                  + f" Over {lds['subsets']} subsets, the Spearman of an unrelated ranking has a standard deviation of "
                  f"about {1 / np.sqrt(max(lds['subsets'] - 1, 1)):.2f}; the `random` row is one draw of it.", "",
                  "| estimator | Spearman |", "|---|---|"]
        lines += [f"| {n}{'' if n.startswith(CONCEPT_ESTIMATORS) else ' (not a concept estimator)'} | {r:.3f} |"
                  for n, r in lds["spearman"].items()]
        lines.append("")
    if "query_study" in results:
        from .query_study import summarise_study

        lines += ["## Query study (this model)", "", "Mean and minimum AUROC and mean AUPRC of Concept Influence over "
                  "every variant (query_study.json has each); see benchmarks/query_study.md for all benchmarks and seeds.", "",
                  "| query | mean AUROC | min AUROC | mean AUPRC |", "|---|---|---|---|"]
        lines += [f"| {k} | {a:.3f} | {lo:.3f} | {p:.3f} |" for k, a, lo, p in
                  summarise_study({"run": results["query_study"]}, "query")]
        lines.append("")
    lines += curvature_lines(results)
    if "sae" in results:
        from .sae_stage import format_sae_report

        lines += format_sae_report(results)
    if "plots" in results:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in results["plots"].items()] + [""]
    return "\n".join(lines)


#: the steered positions of the concept check that contain the tokens each query reads
QUERY_POSITIONS = {"last_prompt": "prompt", "prompt_mean": "prompt", "response_mean": "all", "all_tokens": "all"}


def concept_lines(results: dict, where: str | None = None, in_own_units: str | None = None) -> list[str]:
    """Is the concept causal (the steering check, also at the positions the query reads) and does planting move it?
    Said plainly when it is not. ``where``: where the query reads the concept (default: the run's ``query``);
    ``in_own_units``: what steering by the concept's own scale does, said instead of the plain warning when the check
    per σ is not causal but the concept is in its own units."""
    check, shift = results.get("concept_check"), (results.get("behaviour") or {}).get("concept_shift")
    if not check and not shift:
        return []
    query = results.get("query", "last_prompt")
    lines = ["## Is the concept causal?", "", f"Concept Influence reads the concept at "
             f"{where or f'`{query}` on the evaluation prompts'}.", ""]
    if check:
        where = "held-out evaluation prompts" if check["held_out"] else "the probe's examples (not held out)"
        lines += [f"Steering along the probe direction on {where} ({check['n_positive']} planted, {check['n_negative']} "
                  f"clean answers; separation AUROC {check['separation_auroc']:.3f}):", "",
                  "| steered positions | first-order effect (nats per sd) | verdict |", "|---|---|---|"]
        lines += [f"| {p} | {check['first_order'][p]:+.4f} ± {check['first_order_se'][p]:.4f} | {v} |"
                  for p, v in check["verdicts"].items()]
        lines += ["", f"**{check['explanation']}**", ""]
        bears = QUERY_POSITIONS.get(query)
        if bears in check["verdicts"] and bears != check.get("judged", "all"):
            lines += [f"At the positions the query reads ({bears} positions) the check says **{check['verdicts'][bears]}** "
                      f"({check['first_order'][bears]:+.4f} ± {check['first_order_se'][bears]:.4f} nats per sd).", ""]
    if shift:
        lines += [f"Planting moves the concept f by {shift['gain']:+.4f} = {shift['effect_size']:.1f} × the seeds' sd "
                  f"(clean {np.mean(shift['clean']):.4f}, planted {np.mean(shift['planted']):.4f}; one-sided Welch "
                  f"p = {shift['p_value']:.2g})."
                  + ("" if shift["raised"] else " **Planting does not measurably move the concept, so no concept "
                     "estimator can find the planted data through it.**"), ""]
    if in_own_units:
        lines += [in_own_units, ""]
    elif check and check["verdict"] != "causal":
        lines += ["**The concept is not causal for the behaviour here: the concept rows of the table below "
                  "(concept_influence, concept_grad_dot) cannot be read as evidence of which data causes it.**", ""]
    return lines


def curvature_lines(results: dict) -> list[str]:
    """The run's curvature study, when it has one."""
    if "curvature_study" not in results:
        return []
    from .curvature_study import format_curvature_table

    return ["## Curvature study (this model)", "", "Concept Influence AUROC for every preconditioning variant, one scoring "
            "pass per checkpoint (`bench curvature-table` merges runs).", "",
            format_curvature_table({"AUROC": results["curvature_study"]}), ""]


def command_line() -> str:
    """The command that started this process, for the report."""
    return "concept-influence " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def format_check_table(runs: dict[str, dict]) -> str:
    """One row per benchmark run (its results.json): model and planting settings beside the steering check of its
    probe and the retrieval AUROC of the concept estimators and the fast path, to show where a concept is causal."""
    rows = ["| run | blocks × d_model | pre-train chats × epochs | pool, rate | fine-tune epochs | probe | separation "
            "AUROC | first-order effect, all positions (nats/σ) | prompt positions | verdict | CI AUROC | "
            "CI[checkpoints] AUROC | probe_projection AUROC |", "|---" * 13 + "|"]
    for name, r in runs.items():
        c, check, est = r["config"], r["concept_check"], r["estimators"]
        effect, se = check["first_order"], check["first_order_se"]
        summed = est.get("concept_influence[checkpoints]", {}).get("auroc")
        rows.append(f"| {name} | {c['n_layers']} × {c['d_model']} | {r['splits']['pretrain']} × {c['pretrain_epochs']} | "
                    f"{r['splits']['pool']}, {c['rate']} | {c['finetune_epochs']} | {c['probe_kind']} at "
                    f"{check['hook_name']} | {check['separation_auroc']:.2f} | {effect['all']:+.4f} ± {se['all']:.4f} | "
                    f"{effect['prompt']:+.4f} ± {se['prompt']:.4f} | {check['verdict']} | "
                    f"{est['concept_influence']['auroc']:.3f} | {'—' if summed is None else f'{summed:.3f}'} | "
                    f"{est['probe_projection']['auroc']:.3f} |")
    return "\n".join(rows)
