"""The planted benchmark's SAE stage (``--sae-latents D_SAE``): SAE-latent concepts next to the probe concept.

After the planted benchmark has fine-tuned the model, trained the probe and scored the pool, this stage

1. trains an SAE (SAE-Lens, TopK) at the probe's hook on the fine-tuned model's activations over the pool;
2. ranks its latents by how well they separate the probe set's planted from clean answers (AUROC, mean difference,
   cosine with the probe) — the behaviour's latents;
3. scores the pool with the best latent as the concept: Concept Influence (same EK-FAC fit) and the fast path, each
   with f = the latent's activation (nonlinear) and with its decoder direction;
4. explains the top-k (k = number planted) of each ranking with SAE latents, and asks whether the latents the
   top-ranked data carries are the behaviour's latents (overlap with the 10 best-separating latents, against chance).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from probes.directions import ConceptDirection
from probes.sae_latents import latent_separation

from ..curvature import Curvature
from ..data import TokenizedExample
from ..estimators import ConceptInfluence, ProbeProjection
from ..evaluation import retrieval_metrics
from ..explain import explain_top
from ..models import ModelAdapter
from ..plots import plot_latent_influence
from ..sae_concepts import describe_latents, latent_activations, latent_concept, top_activating_examples
from ..sae_training import train_sae
from ..scores import Scores

__all__ = ["SAE_ESTIMATORS", "sae_section", "format_sae_report"]

SAE_ESTIMATORS = ("sae_concept_influence", "sae_probe_projection", "sae_decoder_concept_influence",
                  "sae_decoder_projection")
EXPLAINED = ("planted (oracle)", "concept_influence", "probe_projection", "influence_function", "sae_concept_influence",
             "sae_probe_projection", "random")
N_BEHAVIOUR = 10  # the behaviour's latents: the 10 best-separating ones


def sae_section(adapter: ModelAdapter, hook: str, probe_sets: tuple[Sequence[TokenizedExample], Sequence[TokenizedExample]],
                pool: list[TokenizedExample], labels: list[int], own: Sequence[TokenizedExample],
                probe_direction: ConceptDirection, curvature: Curvature, scores: dict[str, np.ndarray],
                estimators: dict, cfg, out: Path, progress: bool) -> dict:
    """Run the SAE stage; adds the SAE estimators' scores to ``scores`` and their retrieval to ``estimators``
    (the results' estimator table) and returns the stage's results."""
    t0 = time.perf_counter()
    trained = train_sae(adapter, pool, hook, cfg.sae_latents, out / "sae", k=cfg.sae_k, epochs=cfg.sae_epochs,
                        seed=cfg.seed, model_name="planted benchmark model", progress=progress)
    sae, m = trained.sae, trained.metrics
    print(f"SAE: {cfg.sae_latents} latents (top-{cfg.sae_k}) at {hook} on {m['train_tokens']} pool tokens, held-out "
          f"explained variance {m['explained_variance']:.3f}, {m['dead_latents']} dead ({time.perf_counter() - t0:.0f} s)")
    pos, neg = (latent_activations(sae, adapter, x) for x in probe_sets)
    ranking = latent_separation(pos, neg, sae, probe_direction)
    pool_acts = latent_activations(sae, adapter, pool)
    # the behaviour's latents: the best-separating ones among those that fire on the probe set, above chance
    behaviour = [r["latent"] for r in ranking.rows() if r["freq_pos"] + r["freq_neg"] > 0 and r["auroc"] > 0.5]
    behaviour = behaviour[:N_BEHAVIOUR] or ranking.top(1)
    best = behaviour[0]
    ranking.labels = describe_latents(pool_acts, pool, adapter.tokenizer, behaviour)
    by_cosine = int(ranking.latents[np.argmax(np.abs(ranking.columns["cos_decoder"]))])
    print(f"best latent {best}: AUROC {ranking.row(best)['auroc']:.3f} on the probe set "
          f"({ranking.labels[best]}); the latent whose decoder is closest to the probe is {by_cosine}")

    ids = [e.id for e in pool]
    section: dict = {"training": m, "behaviour_latents": [ranking.row(l) for l in behaviour], "best_latent": best,
                     "closest_to_probe": ranking.row(by_cosine),
                     "best_latent_examples": top_activating_examples(pool_acts, pool, adapter.tokenizer, best, 5),
                     "estimators": {}, "explain": {}}
    made = {"sae_concept_influence": lambda: ConceptInfluence(latent_concept(sae, best, own), curvature),
            "sae_probe_projection": lambda: ProbeProjection(latent_concept(sae, best, own)),
            "sae_decoder_concept_influence": lambda: ConceptInfluence(latent_concept(sae, best, own, kind="decoder"),
                                                                      curvature),
            "sae_decoder_projection": lambda: ProbeProjection(latent_concept(sae, best, own, kind="decoder"))}
    section["concept_value"] = float(made["sae_probe_projection"]().concept.evaluate(adapter)[0])
    for name, make in made.items():
        t1 = time.perf_counter()
        s = make().score(adapter, pool, batch_size=cfg.batch_size, progress=progress)
        seconds = time.perf_counter() - t1
        s.estimator = name
        s.save(out / "scores" / f"{name}.safetensors")
        scores[name] = s.column(0)
        estimators[name] = {**retrieval_metrics(scores[name], labels), "seconds_per_1k": 1000 * seconds / len(pool)}

    k = int(sum(labels))
    alive = int((pool_acts.max > 0).any(0).sum())
    section["chance_overlap"] = min(len(behaviour) * N_BEHAVIOUR / max(alive, 1), len(behaviour))
    section["alive_latents"] = alive
    auroc = dict(zip(ranking.latents.tolist(), ranking.columns["auroc"].tolist()))
    plots = {}
    planted_ids = {i for i, y in zip(ids, labels) if y}
    for name in EXPLAINED:
        values = np.asarray(labels, dtype=float) if name.startswith("planted") else scores.get(name)
        if values is None:
            continue
        e = explain_top(Scores(ids, values, name), sae, adapter, pool, k, activations=pool_acts, labels=ranking.labels,
                        center=True)
        views = {"distinctive": e.distinctive_latents(N_BEHAVIOUR), "elevated": e.elevated_latents(N_BEHAVIOUR),
                 "influential": e.influential_latents(N_BEHAVIOUR)}
        section["explain"][name] = {
            "planted_in_top_k": len(planted_ids.intersection(e.top_ids)),
            **{f"{v}_latents": lat for v, lat in views.items()},
            **{f"{v}_overlap": len(set(lat) & set(behaviour)) for v, lat in views.items()},
            **{f"{v}_mean_auroc": float(np.mean([auroc[l] for l in lat])) if lat else float("nan")
               for v, lat in views.items()},
        }
        if name in ("concept_influence", "sae_concept_influence", "probe_projection"):
            shown = e.influential_latents(12) + e.shared_latents(12) + e.distinctive_latents(12)
            e.labels = {**describe_latents(pool_acts, pool, adapter.tokenizer, sorted(set(shown))), **ranking.labels}
            plots[name] = plot_latent_influence(e, out / f"latent_influence_{name}.png").name
    section["plots"] = plots
    section["seconds"] = time.perf_counter() - t0
    return section


def format_sae_report(results: dict) -> list[str]:
    """The SAE stage as markdown lines for ``results.md``."""
    s = results["sae"]
    t, est = s["training"], results["estimators"]
    best = s["behaviour_latents"][0]
    lines = ["## SAE latents as the concept", "",
             f"SAE-Lens TopK SAE (k = {t['k']}), {t['d_sae']} latents at `{t['hook_name']}`, trained on "
             f"{t['train_tokens']} tokens of the pool ({t['epochs']:g} epochs, {t['seconds']:.0f} s): held-out explained "
             f"variance {t['explained_variance']:.3f}, L0 {t['l0']:.0f}, {t['dead_latents']} dead latents, "
             f"{s['alive_latents']} firing on the pool.", "",
             "The behaviour's latents: the (at most 10) latents that best separate the probe set's planted from clean "
             "answers (AUROC of the mean activation over response tokens, above 0.5, among latents that fire there):", "",
             "| latent | top tokens | AUROC | mean diff | freq planted | freq clean | cos(decoder, probe) |",
             "|---|---|---|---|---|---|---|"]
    for r in s["behaviour_latents"]:
        lines.append(f"| {r['latent']} | {r.get('label', '')} | {r['auroc']:.3f} | {r['diff']:.3f} | {r['freq_pos']:.2f} | "
                     f"{r['freq_neg']:.2f} | {r['cos_decoder']:.3f} |")
    c = s["closest_to_probe"]
    lines += ["", f"For comparison the probe itself has held-out AUROC {results['probe']['roc_auc']:.3f}. The latent "
              f"whose decoder row is closest to the probe direction is {c['latent']} (cosine {c['cos_decoder']:.3f}, "
              f"AUROC {c['auroc']:.3f}).", "",
              f"Concept = latent {best['latent']}; its activation on the model's own evaluation answers is "
              f"{s['concept_value']:.4f}. Retrieval of the planted examples, probe concept vs SAE-latent concept:", "",
              "| concept | estimator | AUROC | AUPRC | P@k | s/1k ex |", "|---|---|---|---|---|---|"]
    pairs = [("probe", "concept_influence"), ("probe", "probe_projection"),
             (f"latent {best['latent']} activation", "sae_concept_influence"),
             (f"latent {best['latent']} activation", "sae_probe_projection"),
             (f"latent {best['latent']} decoder direction", "sae_decoder_concept_influence"),
             (f"latent {best['latent']} decoder direction", "sae_decoder_projection")]
    for concept, name in pairs:
        m = est[name]
        lines.append(f"| {concept} | {name} | {m['auroc']:.3f} | {m['auprc']:.3f} | {m['precision_at_k']:.3f} | "
                     f"{m['seconds_per_1k']:.2f} |")
    lines += ["", "Top activating pool examples of the concept latent:", ""]
    lines += [f"- {r['max']:.2f} `{r['id']}`: {r['snippet']}" for r in s["best_latent_examples"]]
    lines += ["", "**Do the top-ranked examples carry the behaviour's latents?** For the top k (= number planted) of each "
              "ranking, three views of the latents it carries: the 10 most *over-represented* (present among an "
              "example's 8 most active latents more often than in the whole pool), the 10 most *elevated* (mean "
              "activation raised most, in pool standard deviations) and the 10 with the largest *aggregated influence* "
              "(each score minus the pool's mean score, split over the latents by activation share). "
              "For each: how many are among the behaviour's latents above (chance ≈ "
              f"{s['chance_overlap']:.2f}) and their mean AUROC on the probe set. `planted (oracle)` explains the "
              "planted examples themselves: what a perfect ranking would show.", "",
              "| ranking | planted in top k | over-represented: overlap | AUROC | elevated: overlap | AUROC | "
              "influential: overlap | AUROC |", "|---|---|---|---|---|---|---|---|"]
    n = len(s["behaviour_latents"])
    for name, r in s["explain"].items():
        lines.append(f"| {name} | {r['planted_in_top_k']} | " + " | ".join(
            f"{r[f'{v}_overlap']}/{n} | {r[f'{v}_mean_auroc']:.3f}" for v in ("distinctive", "elevated", "influential"))
            + " |")
    lines += ["", *[f"![latent influence, {k}]({v})" for k, v in s["plots"].items()], ""]
    return lines
