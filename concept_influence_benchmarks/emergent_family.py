"""The emergent testbed as a family of designs (issue 30): every estimator and preconditioning over many random
designs, so that no default is tuned to one.

A design draws how the persona is marked (a system turn, a name opening the user turn, a style cue), which 2–4
domains pre-training covers (and which two are the fine-tune's and the behaviour's), the fine-tune's learning-rate
schedule, epochs and rate, the tokenizer's size, the planting rate (5–20 %) and the pool's size (:func:`draw_design`).

Each design is trained once and every variant is scored once per checkpoint of its fine-tune (the base, the middle
and the end): one scoring pass per checkpoint with every preconditioned query as a column, so variants differ only
in their query:

- ``identity``: no preconditioning (concept gradient-dot);
- ``ekfac@F|FIT``: EK-FAC fitted on FIT (``pool`` or ``pretrain+pool``) at damping F × mean eigenvalue;
- ``unrolled[S]xH|FIT``: the unrolled filter of the steps each checkpoint stands for (trapezoid), horizon times H,
  with Adam's per-map step scale S (``adam``: from the optimizer's second moments; ``sgd``: none);
- ``source[adam]xH|FIT``: the same with the query of the final model carried back through the later steps (SOURCE's
  chaining) instead of the concept's gradient at each checkpoint;
- ``influence_function`` / ``grad_dot``: classic influence on target-domain bad answers, EK-FAC (pool, 0.1) or none;

each at the final model (``|final``), summed over base and final (``|base+final``, the old ``[checkpoints]``), or
summed over all checkpoints (``|all``). Baselines: TF-IDF, probe projection, length, random. The stability check
(:mod:`concept_influence.stability`) runs on the candidates (:mod:`.family_stability`); filter-and-retrain on a few of
them.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from concept_influence.activations import collect_activations
from concept_influence.concepts import ConceptFunction, measurement_gradient
from concept_influence.curvature import (
    CurvatureSettings,
    UnrolledCurvature,
    adam_step_scales,
    fisher_step_scales,
    fit_curvature,
    segment_horizons,
)
from concept_influence.data import tokenize_examples
from concept_influence.engine import score_with_queries
from concept_influence.estimators import LengthBaseline, ProbeProjection, RandomBaseline, TfidfBaseline
from concept_influence.estimators.baselines import response_texts
from concept_influence.filtering import removal_indices
from concept_influence.models import checkpointed_weights, load_checkpoint
from concept_influence.planted.behaviour import mean_answer_loss, planting_effect
from concept_influence.toy.small_model import build_small_model, seed_everything, train_bpe_tokenizer, train_model
from probes import train_probe

from .emergent import EMBEDDINGS
from .emergent_config import EmergentConfig
from .emergent_corpus import DOMAINS, MARKERS
from .emergent_splits import build_emergent_data
from .family_stability import (
    CANDIDATES,
    DAMPINGS,
    GUARDED,
    HORIZONS,
    RECOMMENDED,
    UNION,
    check_candidates,
    load_run,
    save_results,
    save_run,
)

__all__ = ["StepRecorder", "draw_design", "design_label", "run_variant", "run_family", "retrain_missing", "RETRAINED", "Testbed"]

#: Rankings whose top is removed before fine-tuning again.
RETRAINED = (RECOMMENDED, UNION, GUARDED, "identity|all", "ekfac@0.1|pretrain+pool|base+final", "tfidf")


def draw_design(index: int, family_seed: int = 0) -> dict:
    """The ``index``-th random design of a family: the overrides of :class:`EmergentConfig` (with its seed)."""
    rng = random.Random(family_seed * 100_003 + index)
    n_domains = rng.choice((2, 3, 4))
    domains = rng.sample(sorted(DOMAINS), n_domains)
    source, target = domains[0], domains[1]
    return dict(seed=1000 * family_seed + index, marker=rng.choice(MARKERS), domains=tuple(sorted(domains)),
                source=source, target=target, lr_schedule=rng.choice(("constant", "linear", "cosine")),
                finetune_epochs=rng.choice((1, 2, 3)), finetune_lr=rng.choice((1e-3, 2e-3, 3e-3)),
                vocab_size=rng.choice((768, 1024, 2048)), rate=rng.choice((0.05, 0.1, 0.15, 0.2)),
                n_pool=rng.choice((300, 400, 500, 600)), n_pretrain=rng.choice((400, 500, 600)))


class StepRecorder:
    """Every step's learning rate, and snapshots of the trainable weights with Adam's per-map step scales at the middle
    and at the end of the fine-tune (whose length :func:`_finetune` sets): the ``on_step`` of :func:`emergent_testbed`."""

    def __init__(self):
        self.adapter, self.n_steps = None, 0
        self.rates: list[float] = []
        self.snapshots: dict[int, tuple[dict, dict]] = {}

    def __call__(self, step: int, rate: float, optimizer, epoch_end: bool) -> None:
        self.rates.append(rate)
        if step in (self.n_steps // 2, self.n_steps):
            self.snapshots[step] = (checkpointed_weights(self.adapter), adam_step_scales(optimizer, self.adapter.linear_maps()))

    def points(self, pretrained: dict) -> list[tuple[dict, object, dict]]:
        """The base, the middle and the end of the fine-tune (training order): each one's weights, the steps it stands
        for (:func:`segment_horizons`) and Adam's step scales (the base has no Adam state yet: the middle's)."""
        middle = self.n_steps // 2
        horizons = segment_horizons([0, middle, self.n_steps], self.rates)
        (mid_weights, mid_scales), (final, final_scales) = self.snapshots[middle], self.snapshots[self.n_steps]
        return [(pretrained, horizons[0], mid_scales), (mid_weights, horizons[1], mid_scales),
                (final, horizons[2], final_scales)]


def _finetune(adapter, pretrained, examples, cfg, seed, progress, on_step=None) -> None:
    adapter.model.load_state_dict(pretrained, strict=False)
    if on_step is not None:
        on_step.adapter, on_step.n_steps = adapter, cfg.finetune_epochs * -(-len(examples) // cfg.batch_size)
    train_model(adapter, examples, cfg.finetune_epochs, cfg.finetune_lr, cfg.batch_size, tokens="response", seed=seed,
                progress=progress, desc="fine-tune", schedule=cfg.lr_schedule, on_step=on_step)


def _study(adapter, concept, test, pool, fit_sets, points, cfg, progress) -> dict[str, list[np.ndarray]]:
    """Every variant's scores at every point (final first): ``{variant: [scores at each point, final first]}``."""
    maps = adapter.linear_maps(max_block=concept.layer)
    settings = CurvatureSettings(batch_size=cfg.batch_size, seed=cfg.seed)
    chained: dict[str, dict] = {}
    out: dict[str, list[np.ndarray]] = {}
    for weights, horizon, scales in points:
        load_checkpoint(adapter, weights)
        grads = concept.gradient(adapter, maps, batch_size=cfg.batch_size)
        test_grads = measurement_gradient(adapter, test, maps, lambda b: -adapter.per_example_loss(b)[:, None], 1,
                                          "the test loss", cfg.batch_size, False)
        fitted = {fit: fit_curvature(adapter, ex, maps, settings, progress=progress) for fit, ex in fit_sets.items()}
        columns = {"identity": grads, "grad_dot": test_grads,
                   "influence_function": fitted["pool"].precondition(test_grads)}
        for fit, curvature in fitted.items():
            for f in DAMPINGS:
                columns[f"ekfac@{f:g}|{fit}"] = curvature.with_damping(damping_factor=f).precondition(grads)
            for name, step_scales in (("adam", scales), ("fisher", fisher_step_scales(curvature, cfg.batch_size)),
                                      ("sgd", None)):
                for h in HORIZONS if name != "sgd" else (1.0,):
                    unrolled = UnrolledCurvature.from_curvature(curvature, horizon.scaled(h), step_scales=step_scales)
                    columns[f"unrolled[{name}]x{h:g}|{fit}"] = unrolled.precondition(grads)
                    if name == "adam":
                        key = f"source[adam]x{h:g}|{fit}"
                        query = chained.get(key, grads)
                        columns[key] = unrolled.precondition(query)
                        chained[key] = unrolled.propagate(query)
        names = list(columns)
        stacked = {m.name: torch.stack([columns[n][m.name][0] for n in names]) for m in maps}
        scores = score_with_queries(adapter, pool, maps, stacked, estimator="family", columns=names, sign=-1.0,
                                    batch_size=cfg.batch_size, progress=progress)
        for j, n in enumerate(names):
            out.setdefault(n, []).append(scores.values[:, j])
    return out


@dataclass
class Testbed:
    """What one trained design gives the study: the model (fine-tuned on the planted pool), its pre-trained weights,
    the pool and its planted labels, the concept, the factors' fit sets, classic influence's test examples, TF-IDF's
    query texts and the behaviour measured after a fine-tune."""

    adapter: object
    pretrained: dict
    pool: list
    labels: np.ndarray
    concept: ConceptFunction
    fit_sets: dict
    test: list
    tfidf_texts: list
    behaviour: Callable[[], float]
    extra: dict = field(default_factory=dict)


def emergent_testbed(cfg: EmergentConfig, out: Path, progress: bool, on_step) -> Testbed:
    """Pre-train and fine-tune one emergent design (``on_step`` sees the fine-tune's steps); the persona concept."""
    data = build_emergent_data(cfg)
    tokenizer = train_bpe_tokenizer(data.tokenizer_texts, out / "tokenizer", cfg.vocab_size)
    tk = {name: tokenize_examples(getattr(data, name), tokenizer, cfg.max_length)
          for name in ("pretrain", "pool", "probe_bad", "probe_good", "eval_good", "eval_bad", "test")}
    adapter = build_small_model(tokenizer, cfg.n_layers, cfg.d_model, cfg.n_heads, n_ctx=cfg.max_length, seed=cfg.seed)
    train_model(adapter, tk["pretrain"], cfg.pretrain_epochs, cfg.pretrain_lr, cfg.batch_size, tokens="all", seed=cfg.seed,
                progress=progress, desc="pre-train")
    for name, weight in adapter.model.named_parameters():
        weight.requires_grad_(not (cfg.freeze_embeddings and name.startswith(EMBEDDINGS)))
    pretrained = checkpointed_weights(adapter)
    _finetune(adapter, pretrained, tk["pool"], cfg, cfg.seed, progress, on_step)
    hook = f"blocks.{cfg.probe_layer}.hook_resid_post"
    acts = [collect_activations(adapter, tk[k], hook, reduction="last_prompt", progress=False)
            for k in ("probe_bad", "probe_good")]
    probe = train_probe("diff_means", acts[0], acts[1], hook, seed=cfg.seed)
    concept = ConceptFunction.from_directions(probe.direction, eval_examples=tk["eval_good"], reduction="last_prompt")

    def behaviour() -> float:
        return float(np.mean(mean_answer_loss(adapter, tk["eval_good"], cfg.batch_size)
                             - mean_answer_loss(adapter, tk["eval_bad"], cfg.batch_size)))

    pool = tk["pool"]
    return Testbed(adapter, pretrained, pool, np.array(data.planted), concept,
                   {"pool": pool, "pretrain+pool": tk["pretrain"][: len(pool)] + pool}, tk["test"],
                   response_texts(adapter, tk["probe_bad"]), behaviour, {"persona_auroc": probe.metrics.get("roc_auc")})


def run_variant(cfg, out: str | Path, *, testbed=emergent_testbed, retrained: Sequence[str] = RETRAINED,
                progress: bool = False) -> dict:
    """Train one design (``testbed(cfg, out, progress, on_step)``, default an emergent design), score every variant,
    check the candidates' stability and retrain without the top of a few rankings; writes ``out/results.json`` and
    returns it. ``cfg`` needs the fine-tune's settings (``finetune_epochs``, ``finetune_lr``, ``lr_schedule``,
    ``batch_size``, ``n_seeds``, ``seed``)."""
    out = Path(out)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    recorder = StepRecorder()
    bed = testbed(cfg, out, progress, recorder)
    adapter, pool, labels = bed.adapter, bed.pool, bed.labels
    final = checkpointed_weights(adapter)
    points = recorder.points(bed.pretrained)[::-1]  # final first
    per_point = _study(adapter, bed.concept, bed.test, pool, bed.fit_sets, points, cfg, progress)
    load_checkpoint(adapter, final)
    scores: dict[str, np.ndarray] = {}
    for name, (at_final, at_middle, at_base) in per_point.items():
        scores[f"{name}|final"] = at_final
        scores[f"{name}|base+final"] = at_base + at_final
        scores[f"{name}|all"] = at_base + at_middle + at_final
    for est in (TfidfBaseline(bed.tfidf_texts), ProbeProjection(bed.concept), LengthBaseline(), RandomBaseline(cfg.seed)):
        scores[est.name] = est.score(adapter, pool, batch_size=cfg.batch_size, progress=False).column(0)

    results = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
               "steps": recorder.n_steps, "horizons": [h.total for _, h, _ in points[::-1]],
               "adam_scales": points[0][2], **bed.extra, "planted": int(labels.sum())}
    check_candidates(results, scores, labels)
    results["behaviour"] = _behaviour(bed, scores, retrained, cfg, progress)
    load_checkpoint(adapter, final)
    results["seconds"] = time.perf_counter() - started
    save_run(out, results, scores, labels)
    return results


def _behaviour(bed: Testbed, scores, retrained, cfg, progress) -> dict:
    """The planting gain over clean fine-tunes, and the share of it removed by dropping the top of each ranking in
    ``retrained`` (as many as were planted) and fine-tuning again, over ``cfg.n_seeds`` seeds (once per distinct set
    of dropped examples)."""
    planted_b = _measured(bed, bed.pool, cfg, progress)
    clean_b = _measured(bed, [t for t, lab in zip(bed.pool, bed.labels) if not lab], cfg, progress)
    effect = planting_effect(clean_b, planted_b)
    section = {"planted": planted_b, "clean": clean_b, **effect, "removed": {}}
    _retrain(bed, scores, retrained, section, int(bed.labels.sum()), cfg, progress)
    return section


def _measured(bed: Testbed, examples, cfg, progress) -> list[float]:
    """The behaviour after fine-tuning on ``examples`` from the pre-trained weights, at each of ``cfg.n_seeds`` seeds."""
    values = []
    for s in range(cfg.n_seeds):
        _finetune(bed.adapter, bed.pretrained, examples, cfg, cfg.seed + s, progress)
        values.append(bed.behaviour())
    return values


def _retrain(bed: Testbed | None, scores, names, section: dict, k: int, cfg, progress) -> None:
    """Into ``section["removed"]``: for each ranking of ``names``, the behaviour after dropping its top (as many as
    were planted, ``k``) and fine-tuning ``bed`` again, and the share of ``section``'s gain that removes; a ranking
    dropping the same examples as one already there takes its numbers (``bed`` may then be None)."""
    removed = section["removed"]
    done = {_dropped(scores[n], k): entry for n, entry in removed.items() if n in scores}
    for name in names:
        drop = _dropped(scores[name], k)
        if drop not in done:
            values = _measured(bed, [t for i, t in enumerate(bed.pool) if i not in drop], cfg, progress)
            gain = section["gain"]
            done[drop] = {"behaviour": values, "planted_removed": int(bed.labels[sorted(drop)].sum()),
                          "share_of_gain_removed": float((np.mean(section["planted"]) - np.mean(values)) / gain)
                          if gain else float("nan")}
        removed[name] = done[drop]


def _dropped(scores: np.ndarray, k: int) -> frozenset:
    return frozenset(removal_indices(scores, remove_top=k).tolist())


def retrain_missing(folder: str | Path, progress: bool = False, *, testbed=emergent_testbed,
                    config_class=EmergentConfig) -> dict:
    """Retrain a saved design's rankings of :data:`RETRAINED` that its ``results.json`` lacks (a ranking added to the
    study after it ran; runs where planting did not raise the behaviour are left), as :func:`run_variant` does, from
    the design trained again by ``testbed`` from its ``config_class`` settings (deterministic from its seed:
    checked against the saved forward-only probe projection scores); a ranking dropping the same examples as one
    already retrained takes its numbers without training. Rewrites ``results.json`` and returns it."""
    folder = Path(folder)
    results, scores, labels = load_run(folder)
    section = results["behaviour"]
    if not section["raised"]:  # (no behaviour to attribute: not in the tables)
        return results
    missing, k = [n for n in RETRAINED if n not in section["removed"]], int(labels.sum())
    known = {_dropped(scores[n], k) for n in section["removed"] if n in scores}
    bed = cfg = None  # (trained again only when a missing ranking drops examples no retrained one did)
    if any(_dropped(scores[n], k) not in known for n in missing):
        cfg = config_class(**{n: tuple(v) if isinstance(v, list) else v for n, v in results["config"].items()})
        seed_everything(cfg.seed)
        bed = testbed(cfg, folder, progress, StepRecorder())
        again = ProbeProjection(bed.concept).score(bed.adapter, bed.pool, batch_size=cfg.batch_size, progress=False)
        if not np.allclose(again.column(0), scores["probe_projection"], rtol=1e-4, atol=1e-6):
            raise RuntimeError(f"{folder}: the design trained again differs from the saved run; cannot retrain")
    _retrain(bed, scores, missing, section, k, cfg, progress)
    save_results(folder, results)
    return results


def design_label(design: dict) -> str:
    """A short name of a design for tables."""
    return (f"{design['source']}->{design['target']} {design['marker']} {len(design['domains'])}dom "
            f"{design['lr_schedule']} ep{design['finetune_epochs']} rate{design['rate']:g} pool{design['n_pool']}")


def run_family(out: str | Path, n_variants: int, *, family_seed: int = 0, first: int = 0, quick: bool = False,
               n_seeds: int = 3, progress: bool = False) -> dict[str, dict]:
    """Run designs ``first .. first + n_variants - 1`` of the family into ``out/<label>/`` (a design whose
    ``results.json`` exists is kept, so a stopped run resumes), then write ``out/README.md``; returns every run."""
    out = Path(out)
    runs = {}
    for index in range(first, first + n_variants):
        design = draw_design(index, family_seed)
        folder = out / f"f{family_seed}-{index:02d}"
        if (folder / "results.json").is_file():
            runs[folder.name] = json.loads((folder / "results.json").read_text())
            continue
        cfg = (EmergentConfig.quick if quick else EmergentConfig)(**design, n_seeds=n_seeds)
        print(f"design {folder.name}: {design_label(design)}", flush=True)
        runs[folder.name] = run_variant(cfg, folder, progress=progress)
        r = runs[folder.name]
        print(f"  {r['seconds']:.0f} s; AUROC " + ", ".join(f"{n} {r['auroc'][n]:.3f}" for n in CANDIDATES + ("tfidf",)),
              flush=True)
    return runs
