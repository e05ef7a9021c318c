"""The stability variants scored beside a ranking in the same pass (damping x0.01 ... x100 or horizon x0.1 and x10, and
identity curvature): equal to scoring with each variant's curvature on its own; in a run folder kept apart from the
run's scores, checked in run.json and the report, resumed without recomputing, and `scoring.require = "stable"`
stopping the run when a variant disagrees."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from concept_influence.concepts import ConceptFunction
from concept_influence.config import RunConfig
from concept_influence.curvature import (
    DAMPING_VARIANTS,
    Curvature,
    Horizon,
    UnrolledCurvature,
    fit_curvature,
    stability_variants,
    variant_kinds,
)
from concept_influence.data import load_chat_jsonl, tokenize_examples
from concept_influence.estimators import ConceptGradDot, ConceptInfluence, GradDot
from concept_influence.models import load_model
from concept_influence.runs import Run, RunError, run_stages
from concept_influence.scores import Scores
from concept_influence.stability import union_ranking
from probes import ConceptDirection

HOOK = "blocks.1.hook_resid_post"


def _close(got: np.ndarray, expected: np.ndarray, tolerance: float = 1e-5) -> None:
    # (float32 rounding: the engine contracts six query columns through each example's gradient, one token by token)
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance * np.abs(expected).max())


@pytest.fixture
def concept(tl_adapter, tokenized):
    torch.manual_seed(0)  # two concepts: the variants' columns are variant-major
    directions = [ConceptDirection(torch.randn(tl_adapter.d_model), HOOK, metadata={"name": n}) for n in ("a", "b")]
    return ConceptFunction.from_directions(directions, eval_examples=tokenized[:3])


@pytest.mark.parametrize("query_rank", [None, 2])
def test_damping_variants_equal_scoring_with_each_damping_and_identity(tl_adapter, tokenized, concept, query_rank):
    curvature = fit_curvature(tl_adapter, tokenized, tl_adapter.linear_maps(max_block=1), batch_size=4, progress=False)
    kw = dict(batch_size=len(tokenized), progress=False)  # one batch of the tiny model
    estimator = ConceptInfluence(concept, curvature, variants=True, query_rank=query_rank, per_module=True)
    scores = estimator.score(tl_adapter, tokenized, **kw)
    variants = estimator.variants_
    assert scores.columns == concept.names and set(scores.per_module["blocks.0.attn.W_Q"].shape) == {12, 2}
    assert variants.per_module is None and variants.ids == scores.ids
    assert variants.metadata["variants"] == {**{f"damping x{f:g}": "damping" for f in DAMPING_VARIANTS},
                                             "identity": "identity"}
    _close(scores.values, ConceptInfluence(concept, curvature, query_rank=query_rank).score(tl_adapter, tokenized, **kw).values)
    for f in DAMPING_VARIANTS:
        damped = ConceptInfluence(concept, curvature.with_damping(damping_factor=0.1 * f), query_rank=query_rank)
        # float32 rounding grows as the damping shrinks (the inverse's largest eigenvalue with it): measured 1.6e-5 of
        # the largest score at x0.01 on this toy, 1.2e-6 at x0.1 and 2e-7 above, so the tolerance scales with 1/f
        _close(variants.select([f"damping x{f:g}:{c}" for c in concept.names]).values,
               damped.score(tl_adapter, tokenized, **kw).values, tolerance=1e-5 * max(1.0, 0.1 / f))
    identity = ConceptGradDot(concept, query_rank=query_rank).score(tl_adapter, tokenized, **kw)
    _close(variants.select([f"identity:{c}" for c in concept.names]).values, identity.values)


def test_horizon_variants_equal_scoring_with_each_horizon(tl_adapter, tokenized, concept):
    horizon = Horizon.constant(0.5, 20)
    ekfac = fit_curvature(tl_adapter, tokenized, tl_adapter.linear_maps(max_block=1), batch_size=4, progress=False)
    unrolled = UnrolledCurvature.from_curvature(ekfac, horizon)
    estimator = ConceptInfluence(concept, unrolled, variants=True)
    estimator.score(tl_adapter, tokenized, batch_size=len(tokenized), progress=False)
    assert list(estimator.variants_.metadata["variants"]) == ["horizon x0.1", "horizon x10", "identity"]
    for f in (0.1, 10):
        expected = ConceptInfluence(concept, unrolled.with_horizon(horizon.scaled(f))).score(tl_adapter, tokenized,
                                                                                           progress=False)
        _close(estimator.variants_.select([f"horizon x{f:g}:{c}" for c in concept.names]).values, expected.values)


def test_identity_has_no_variants(tl_adapter, tokenized, concept):
    assert variant_kinds("identity") == {} and variant_kinds("no such strategy") == {}
    assert set(variant_kinds("kfac")) == {"damping x0.01", "damping x0.1", "damping x10", "damping x100", "identity"}
    estimator = ConceptGradDot(concept, variants=True)
    scores = estimator.score(tl_adapter, tokenized, progress=False)
    assert estimator.variants_.columns == [] and len(estimator.variants_) == len(scores)
    assert stability_variants(estimator.curvature_) == {}


# ---- a run folder (the fixtures project and finished: tests/conftest.py) -----------------------------------------
def test_a_run_keeps_the_variants_apart_and_equal_to_scoring_with_each(finished, project):
    scores = Scores.load(finished / "scores" / "scores.safetensors")
    variants = Scores.load(finished / "scores" / "variants.safetensors")
    concept_name = scores.columns[0]
    assert len(scores.columns) == 1 and variants.ids == scores.ids  # the run's scores: one column per concept
    assert variants.columns == [*(f"{v}:{concept_name}" for v in variant_kinds("ekfac")), "behaviour"]
    adapter = load_model(project / "model")
    cfg = RunConfig.read(project / "run.toml")
    train = tokenize_examples(load_chat_jsonl(cfg.data.train), adapter.tokenizer, cfg.data.max_length, True)
    evals = tokenize_examples(load_chat_jsonl(cfg.concept_eval, 24), adapter.tokenizer, cfg.data.max_length, True)
    concept = ConceptFunction.from_directions(ConceptDirection.load(finished / "probe" / "direction.safetensors"), evals)
    factors = Curvature.load(finished / "factors", adapter)
    for name, curvature in stability_variants(factors).items():
        expected = ConceptInfluence(concept, curvature).score(adapter, train, progress=False)
        _close(variants.column(f"{name}:{concept_name}"), expected.column(0), 1e-4)  # (x0.01: 4e-5, cancellation)
    # the behaviour's own ranking: classic gradient-dot on the probe's positive chats, over the concept's maps
    behaviour = tokenize_examples(load_chat_jsonl(cfg.behaviour_file), adapter.tokenizer, cfg.data.max_length, True)
    _close(variants.column("behaviour"), _MapsGradDot(behaviour, concept.layer).score(adapter, train, progress=False).column(0))
    stability = json.loads((finished / "run.json").read_text())["stages"]["scores"]["stability"]
    assert set(stability["agreement"]) == {*variant_kinds("ekfac"), "behaviour"}
    assert stability["kinds"]["identity"] == "identity" and stability["kinds"]["behaviour"] == "behaviour"
    report = (finished / "report" / "report.md").read_text()
    assert "## Is the top of the ranking stable?" in report and "| damping x0.01 | damping |" in report
    assert ("**NOT stable.**" in report) == bool(stability["warning"])


class _MapsGradDot(GradDot):
    """Classic gradient-dot over the maps of blocks up to ``max_block`` only (a concept's maps)."""

    def __init__(self, examples, max_block: int):
        super().__init__(examples)
        self.max_block = max_block

    def tracked_maps(self, adapter):
        return adapter.linear_maps(max_block=self.max_block)


def test_the_behaviour_column_is_classic_gradient_dot_and_needs_the_variants(tl_adapter, tokenized, concept):
    estimator = ConceptGradDot(concept, variants=True, behaviour=tokenized[:4])
    estimator.score(tl_adapter, tokenized, progress=False)
    assert estimator.variants_.columns == ["behaviour"] and estimator.variants_.metadata["variants"] == {
        "behaviour": "behaviour"}
    _close(estimator.variants_.column("behaviour"),
           _MapsGradDot(tokenized[:4], concept.layer).score(tl_adapter, tokenized, progress=False).column(0))
    with pytest.raises(ValueError, match="variants=True"):
        ConceptGradDot(concept, behaviour=tokenized[:4])


def test_resuming_reuses_the_variants_and_recomputes_a_lost_one(finished, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    shards = out / "scores" / "shards"
    before = {p: p.stat().st_mtime_ns for p in (out / "scores").rglob("*.safetensors")}
    run_stages(("scores",), out, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # a finished run recomputes nothing
    (shards / "variants-000002.safetensors").unlink()  # killed between a shard's variants and its scores
    (shards / "shard-000002.safetensors").unlink()
    Run.open(out).update_record(lambda info: info["stages"].pop("scores"))
    run_stages(("scores",), out, progress=False)
    kept = {p: t for p, t in before.items() if "shards" in p.parts and "000002" not in p.name}
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "finished shards were recomputed"
    for name in ("scores", "variants"):
        a, b = (Scores.load(d / "scores" / f"{name}.safetensors") for d in (finished, out))
        assert a.ids == b.ids and np.array_equal(a.values, b.values)


def _rescore_with_variants(run: Path, variant_values, require: str = "stable", filtered: str | None = None) -> None:
    """Replace the variants' scores of every shard with ``variant_values(the shard's own scores, column name)``, then
    merge the scores again with ``scoring.require`` (and with ``filtered``, a ``filter.ranking``, remove the top 10; no
    shard is scored again)."""
    for path in sorted((run / "scores" / "shards").glob("variants-*.safetensors")):
        shard = Scores.load(path)
        own = Scores.load(path.with_name(path.name.replace("variants", "shard")))
        shard.values = np.stack([variant_values(own.column(0), v) for v in shard.columns], axis=1)
        shard.save(path)
    Run.open(run).update_record(lambda info: info["stages"].pop("scores"))
    config = json.loads((run / "config.json").read_text())
    config["scoring"]["require"] = require
    if filtered:  # (as if the run had been configured with a filter stage from the start)
        config["filter"].update(remove_top=10, ranking=filtered)
        (run / "config.json").write_text(json.dumps(config))
    run_stages(("scores", "report", "filter") if filtered else ("scores", "report"), run,
               RunConfig.from_dict(config, "config"), progress=False)


def test_require_stable_stops_when_a_variant_disagrees_and_goes_on_when_all_agree(finished, tmp_path):
    unstable = tmp_path / "unstable"
    shutil.copytree(finished, unstable)
    with pytest.raises(RunError) as e:  # identity curvature ranks the examples in reverse
        _rescore_with_variants(unstable, lambda own, name: -own if name.startswith("identity") else 3 * own)
    message = str(e.value)
    assert "\n" not in message and "identity (identity: 0.00)" in message and "damping" not in message.split(":")[-1]
    assert 'scoring.require = "none"' in message and (unstable / "scores" / "scores.safetensors").is_file()
    assert not json.loads((unstable / "run.json").read_text())["stages"]["scores"]["stability"]["stable"]
    stable = tmp_path / "stable"
    shutil.copytree(finished, stable)
    _rescore_with_variants(stable, lambda own, name: 2 * own + 1)  # every variant a monotone copy of the ranking
    assert "**Stable**: every variant agrees" in (stable / "report" / "report.md").read_text()


def test_the_report_and_the_filter_answer_with_the_union_of_the_run_and_the_behaviours_ranking(finished, tmp_path):
    run = tmp_path / "union"
    shutil.copytree(finished, run)
    _rescore_with_variants(run, lambda own, name: -own if name == "behaviour" else own, "none", filtered="union")
    record = json.loads((run / "run.json").read_text())["stages"]
    assert "behaviour (behaviour: 0.00)" in record["scores"]["stability"]["warning"]
    assert record["filter"]["ranking"] == "union"
    own, variants = Scores.load(run / "scores" / "scores.safetensors"), Scores.load(run / "scores" / "variants.safetensors")
    union = union_ranking(own.column(0), variants.column("behaviour"))
    top = {own.ids[i] for i in np.argsort(-union)[:10]}
    removed = {r["id"] for r in json.loads(next((run / "filter").glob("*.filter.json")).read_text())["removed_examples"]}
    assert removed == top
    assert top & {i for i, _ in own.top(5)} and top & {i for i, _ in variants.top(5, "behaviour")}  # both tops in it
    report = (run / "report" / "report.md").read_text()
    assert re.search(r"## Top \d+ of the union with the behaviour's own ranking", report)
    plain = tmp_path / "scores-only"  # filter.ranking = "scores": the run's own top
    shutil.copytree(finished, plain)
    _rescore_with_variants(plain, lambda own, name: -own if name == "behaviour" else own, "none", filtered="scores")
    assert json.loads((plain / "run.json").read_text())["stages"]["filter"]["ranking"] == "scores"
    removed = {r["id"] for r in json.loads(next((plain / "filter").glob("*.filter.json")).read_text())["removed_examples"]}
    assert removed == {i for i, _ in own.top(10)}
