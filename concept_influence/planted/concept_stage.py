"""The planted benchmark's concept: the probe and the concept read on the model's own answers, the causal check of
the probe direction, and the queries compared."""

from __future__ import annotations

from pathlib import Path

from probes import ConceptDirection, train_probe

from ..activations import collect_activations
from ..concept_check import check_concept
from ..concepts import ConceptFunction
from ..curvature import Curvature, CurvatureSettings
from ..data import TokenizedExample
from ..estimators import ConceptGradDot, ConceptInfluence, OverCheckpoints
from ..generation import sample_responses
from ..models import ModelAdapter
from .experiment_config import PlantedConfig

__all__ = ["planted_concept", "concept_check_section", "compared_queries", "checkpoint_estimators",
           "broad_factor_estimators", "BROAD_FACTORS"]

#: the name of Concept Influence with EK-FAC fitted on pre-training chats and the pool
BROAD_FACTORS = "concept_influence[pretrain+pool]"


def planted_concept(adapter: ModelAdapter, tk: dict[str, list[TokenizedExample]], cfg: PlantedConfig):
    """The probe of planted (``tk["pos"]``) vs clean (``tk["neg"]``) answers at ``blocks.<cfg.probe_layer>``, the
    model's own answers to the evaluation prompts (``tk["eval"]``), and the concept: the probe read on those answers
    at ``cfg.query``. Returns the three."""
    hook = f"blocks.{cfg.probe_layer}.hook_resid_post"
    acts = [collect_activations(adapter, tk[k], hook, progress=False) for k in ("pos", "neg")]
    probe = train_probe(cfg.probe_kind, acts[0], acts[1], hook, seed=cfg.seed)
    probe.direction.metadata["name"] = "planted_probe"
    own = sample_responses(adapter, tk["eval"], cfg.max_new_tokens, seed=cfg.seed, progress=False, min_new_tokens=1)
    return probe, own, ConceptFunction.from_directions(probe.direction, eval_examples=own, reduction=cfg.query)


def concept_check_section(adapter: ModelAdapter, direction: ConceptDirection, tk: dict[str, list[TokenizedExample]],
                   paired: bool, cfg: PlantedConfig, out: Path) -> dict | None:
    """Steer along the probe direction (:func:`~concept_influence.concept_check.check_concept`): on paired data the
    held-out evaluation prompts with their planted (positive) and clean (negative) answers; on unpaired data the
    probe's own examples (not held out: the separation there is the probe's training fit)."""
    if not cfg.concept_check:
        return None
    if paired:
        positive, negative, held_out = tk["eval_planted"], tk["eval"], True
    else:
        positive, negative, held_out = tk["pos"][: cfg.n_eval], tk["neg"][: cfg.n_eval], False
    check = check_concept(adapter, direction, positive, negative, batch_size=cfg.batch_size)
    check.plot(out / "concept_check.png")
    print(check.format())
    return {**check.to_dict(), "explanation": check.explanation(), "held_out": held_out}


def compared_queries(direction: ConceptDirection, own: list[TokenizedExample], curvature: Curvature,
                      cfg: PlantedConfig) -> list[ConceptInfluence]:
    """``concept_influence[<query>]`` for ``cfg.compare_query`` (today's default before the query study), scored and
    retrained beside the chosen query."""
    if cfg.compare_query is None or cfg.compare_query == cfg.query:
        return []
    estimator = ConceptInfluence(ConceptFunction.from_directions(direction, own, cfg.compare_query), curvature)
    estimator.name = f"concept_influence[{cfg.compare_query}]"
    return [estimator]


def checkpoint_estimators(concept: ConceptFunction, pretrained: dict, pool: list[TokenizedExample],
                          cfg: PlantedConfig) -> list[OverCheckpoints]:
    """``concept_influence[checkpoints]`` and ``concept_grad_dot[checkpoints]``: the same concept scored at the
    pre-trained (base) and at the fine-tuned model and summed (:class:`OverCheckpoints`), EK-FAC fitted on the pool
    at each."""
    if not cfg.over_checkpoints:
        return []
    fit = CurvatureSettings(batch_size=cfg.batch_size, seed=cfg.seed)
    return [OverCheckpoints(lambda: ConceptInfluence(concept, "ekfac", fit_examples=pool, fit=fit), [pretrained, None]),
            OverCheckpoints(lambda: ConceptGradDot(concept), [pretrained, None])]


def broad_factor_estimators(concept: ConceptFunction, pretrained: dict, pretrain: list[TokenizedExample],
                            pool: list[TokenizedExample], cfg) -> list:
    """``concept_influence[pretrain+pool]`` (and its ``[checkpoints]`` sum when ``cfg.over_checkpoints``): EK-FAC
    fitted on as many pre-training chats as the pool holds together with the pool, the curvature of what the model
    was trained on rather than of the narrow pool alone, whose largest directions are the planted data's own. None
    without pre-training chats (a benchmark on the user's model)."""
    if not pretrain:
        return []
    examples = list(pretrain[: len(pool)]) + list(pool)
    fit = CurvatureSettings(batch_size=cfg.batch_size, seed=cfg.seed)

    def make() -> ConceptInfluence:
        estimator = ConceptInfluence(concept, "ekfac", fit_examples=examples, fit=fit)
        estimator.name = BROAD_FACTORS
        return estimator

    return [make(), *([OverCheckpoints(make, [pretrained, None])] if cfg.over_checkpoints else [])]
