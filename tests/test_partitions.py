"""Partitions of maps (issue 27, item 3): the curvature fitted one group of maps at a time equals the unpartitioned
fit, and so do Concept Influence and classic influence scores with it, and the gradient index built from it; groups
from a count, names or a memory plan."""

from __future__ import annotations

import pytest
import torch
from norms import assert_close_in_norm

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import Curvature, CurvatureError, fit_curvature
from concept_influence.curvature.partitions import fit_partitioned, split_maps
from concept_influence.estimators import ConceptInfluence, InfluenceFunction
from concept_influence.index import GradientIndex
from concept_influence.plan import ModelShape, plan_memory
from probes import ConceptDirection

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def whole(any_adapter, tokenized):
    return fit_curvature(any_adapter, tokenized[:6], strategy="ekfac", batch_size=3, progress=False)


def test_split_maps_by_count_names_and_plan(tl_adapter):
    maps = tl_adapter.linear_maps()
    for n in (1, 2, 3, 5, len(maps), len(maps) + 3):
        groups = split_maps(maps, n)
        assert [m.name for g in groups for m in g] == [m.name for m in maps]
        assert len(groups) == min(n, len(maps)) and all(groups)
    names = [[m.name for m in maps[:4]], [m.name for m in maps[4:]]]
    assert [[m.name for m in g] for g in split_maps(maps, names)] == names
    with pytest.raises(CurvatureError, match="in none"):
        split_maps(maps, names[:1])
    with pytest.raises(CurvatureError, match="is in two"):
        split_maps(maps, [names[0], names[0] + names[1]])
    with pytest.raises(CurvatureError, match="not among the tracked maps"):
        split_maps(maps, [["blocks.9.x"]])
    with pytest.raises(CurvatureError, match=">= 1"):
        split_maps(maps, 0)
    shape = ModelShape.from_adapter(tl_adapter)
    plans = (plan_memory(shape, device_memory=m, batch_size=1, max_length=8) for m in range(10**5, 10**7, 10**4))
    plan = next(p for p in plans if p.fits)  # the smallest device the plan fits: more than one partition
    assert plan.n_partitions > 1
    assert [[m.name for m in g] for g in split_maps(maps, plan)] == plan.partitions[0]


@pytest.mark.parametrize("partitions, kept", [(2, "offload"), (5, "offload"), (3, "directory")])
def test_partitioned_factors_equal_unpartitioned(any_adapter, tokenized, whole, tmp_path, partitions, kept):
    """Factors moved off the device per partition, or written to disk per map and streamed back."""
    where = {"offload": "cpu"} if kept == "offload" else {"directory": tmp_path / "c"}
    passes = []

    def accumulate(name, collect):  # each partition's passes go through it (the examples too: none are passed)
        passes.append(name)
        return collect(tokenized[:6])

    part = fit_partitioned(any_adapter, [], None, partitions, strategy="ekfac", batch_size=3, progress=False,
                           accumulate=accumulate, **where)
    assert passes == ["covariance", "eigenvalues"] * min(partitions, len(whole.shapes))
    assert list(part.shapes) == list(whole.shapes) and part.n_examples == whole.n_examples
    if kept == "directory":
        assert part.streams and len(list((tmp_path / "c" / "maps").iterdir())) == len(whole.shapes)
        part = Curvature.load(tmp_path / "c", any_adapter)
    for name in whole.shapes:
        a, b = whole.factors[name], part.factors[name]
        torch.testing.assert_close(b.eigenvalues, a.eigenvalues, rtol=1e-5, atol=1e-7 * float(a.eigenvalues.max()))
        assert part.dampings[name] == pytest.approx(whole.dampings[name], rel=1e-5)
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(3, *s, generator=g) for n, s in whole.shapes.items()}
    got, want = part.precondition(grads), whole.precondition(grads)
    for n in grads:
        assert_close_in_norm(got[n], want[n], 1e-6)


def test_partitioned_scores_equal_unpartitioned(tl_adapter, tokenized, tmp_path):
    direction = ConceptDirection(torch.randn(tl_adapter.d_model, generator=torch.Generator().manual_seed(1)), HOOK,
                                 kind="custom")
    concept = ConceptFunction.from_directions(direction, eval_examples=tokenized[:3])
    maps = tl_adapter.linear_maps()
    whole = fit_curvature(tl_adapter, tokenized, maps, strategy="ekfac", progress=False)
    part = fit_partitioned(tl_adapter, tokenized, maps, 3, strategy="ekfac", progress=False)
    for make in (lambda c: ConceptInfluence(concept, c), lambda c: InfluenceFunction(tokenized[:2], c)):
        a = make(whole).score(tl_adapter, tokenized, progress=False).values
        b = make(part).score(tl_adapter, tokenized, progress=False).values
        assert_close_in_norm(b, a, 1e-6)
    # the gradient index (eigen projection, compressed) from factors stored per map and streamed, as from the whole fit
    stored = fit_partitioned(tl_adapter, tokenized, maps, 3, strategy="ekfac", directory=tmp_path / "f", progress=False)
    built = {name: GradientIndex.build(tmp_path / name, tl_adapter, tokenized, c, projection="eigen", rank=8,
                                       dtype="float32", progress=False) for name, c in (("whole", whole), ("p", stored))}
    for make in (lambda c: ConceptInfluence(concept, c), lambda c: InfluenceFunction(tokenized[:2], c)):
        a = built["whole"].score(make(whole), tl_adapter, progress=False).values
        b = built["p"].score(make(stored), tl_adapter, progress=False).values
        assert_close_in_norm(b, a, 1e-6)
    kfac = fit_partitioned(tl_adapter, tokenized, maps, 2, strategy="kfac", progress=False)
    assert kfac.strategy == "kfac" and list(kfac.shapes) == [m.name for m in maps]
    ident = fit_partitioned(tl_adapter, tokenized, maps, 2, strategy="identity", progress=False)
    assert ident.strategy == "identity"
