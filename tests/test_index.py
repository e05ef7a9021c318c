"""The gradient index in memory: rows against per-example autograd gradients, exact scores when nothing is
compressed, batch and shard invariance, checkpoint sums, the curvatures of a query, and bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from norms import assert_close_in_norm

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import fit_curvature
from concept_influence.data import collate
from concept_influence.estimators import ConceptGradDot, ConceptInfluence, InfluenceFunction, OverCheckpoints
from concept_influence.index import GradientIndex, GradientIndexError
from concept_influence.index.query import empirical_moments, projected_measurement
from concept_influence.index.subspace import damped
from concept_influence.models import HFCausalLMAdapter
from conftest import _hf_model
from probes import ConceptDirection


def _relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _concept(adapter, examples, layer: int = 1, k: int = 2) -> ConceptFunction:
    g = torch.Generator().manual_seed(layer)
    directions = [ConceptDirection(torch.randn(adapter.d_model, generator=g), f"blocks.{layer}.hook_resid_post",
                                   metadata={"name": f"c{j}"}) for j in range(k)]
    return ConceptFunction.from_directions(directions, eval_examples=examples[:4])


@pytest.fixture
def fitted(any_adapter, tokenized):
    return any_adapter, tokenized, fit_curvature(any_adapter, tokenized, batch_size=4, progress=False)


def _assert_exact(index, adapter, examples, estimators, tolerance):
    for est in estimators:
        ref = est.score(adapter, examples, batch_size=4, progress=False)
        got = index.score(est, adapter, progress=False)
        assert got.ids == ref.ids and got.columns == ref.columns and got.estimator == ref.estimator
        assert _relative(got.values, ref.values) < tolerance, est.name


@pytest.mark.parametrize("projection", ["identity", "eigen"])
def test_uncompressed_index_reproduces_exact_scores(fitted, tmp_path, projection):
    """Uncompressed (identity, or all eigenvectors), the index gives Concept Influence, classic influence and the
    identity-curvature scores of the estimators themselves: float32 rows to 1e-4, float16 rows to 1e-3."""
    adapter, examples, curvature = fitted
    concept = _concept(adapter, examples)
    estimators = [ConceptInfluence(concept, curvature), InfluenceFunction(examples[:3], curvature),
                  ConceptGradDot(concept)]
    for dtype, tolerance in (("float32", 1e-4), ("float16", 1e-3))[: 2 if projection == "identity" else 1]:
        index = GradientIndex.build(tmp_path / dtype, adapter, examples, curvature, projection=projection, rank=10**6,
                                    dtype=dtype, shard_size=5, batch_size=3, progress=False)
        _assert_exact(index, adapter, examples, estimators, tolerance)


def test_random_projection_at_full_rank_is_exact(tokenizer, tokenized, tmp_path):
    """Random subspaces spanning everything, with the EK-FAC restricted to them (a dense [D, D] curvature per map),
    give the exact scores too (block 0 of a tiny Llama: D <= 2048)."""
    adapter = HFCausalLMAdapter(_hf_model("llama", len(tokenizer)), tokenizer)
    curvature = fit_curvature(adapter, tokenized, adapter.linear_maps(0), batch_size=4, progress=False)
    index = GradientIndex.build(tmp_path / "i", adapter, tokenized, curvature, projection="random", rank=10**6,
                                dtype="float32", progress=False)
    concept = _concept(adapter, tokenized, layer=0)
    _assert_exact(index, adapter, tokenized, [ConceptInfluence(concept, curvature), ConceptGradDot(concept)], 1e-4)


def test_rows_are_projected_autograd_gradients(fitted, tmp_path):
    """A stored row is scale · P_outᵀ ∇_W L(z) P_in per map, against torch.autograd on each example alone."""
    adapter, examples, curvature = fitted
    index = GradientIndex.build(tmp_path / "i", adapter, examples, curvature, projection="eigen", rank=3,
                                dtype="float32", shard_size=7, batch_size=5, progress=False)
    spaces = index.store.load_spaces(0)
    maps = {m.name: m for m in adapter.linear_maps()}
    _, rows = index.store.rows(0, 0)
    for n, ex in enumerate(examples[:7]):
        loss = adapter.per_example_loss(collate([ex], adapter.pad_token_id)).sum()
        grads = torch.autograd.grad(loss, [maps[s.name].weight for s in spaces])
        ref = torch.cat([s.scale * s.reduce(maps[s.name].to_matrix(g)[None].float()).flatten() for s, g in
                         zip(spaces, grads)])
        assert _relative(rows[n], ref.numpy()) < 1e-4


@pytest.mark.parametrize("projection", ["eigen", "random"])
def test_query_gradients_projected_from_tokens_equal_projected_autograd(fitted, tmp_path, projection):
    """A query's gradient projected from its tokens (concepts K = 3 and a test loss) is P_outᵀ ∇_W f P_in with ∇_W f
    from torch.autograd on the weights, batch by batch over uneven batches."""
    adapter, examples, curvature = fitted
    index = GradientIndex.build(tmp_path / "i", adapter, examples, curvature, projection=projection, rank=3,
                                dtype="float32", progress=False)
    spaces = index.store.load_spaces(0)
    maps = adapter.linear_maps(1)
    concept = _concept(adapter, examples, layer=1, k=3)
    test_loss = InfluenceFunction(examples[:5], curvature)
    for est, f in ((ConceptInfluence(concept, curvature), lambda: concept.per_example(
                        adapter, collate(examples[:4], adapter.pad_token_id)).mean(0)),
                   (test_loss, lambda: -adapter.per_example_loss(collate(examples[:5], adapter.pad_token_id)).mean()[None])):
        got, _ = projected_measurement(est, adapter, maps, spaces, batch_size=3)
        with adapter.tracking(maps):
            values = f()
            for j in range(len(values)):
                ref = torch.autograd.grad(values[j], [m.weight for m in maps], retain_graph=True, allow_unused=True)
                for m, g in zip(maps, ref):
                    s = next(s for s in spaces if s.name == m.name)
                    assert got[m.name].shape[1:] == s.ranks
                    if g is None:  # the map does not reach the query
                        assert not got[m.name][j].any(), m.name
                    else:  # in norm (tests/norms.py): ~1e-6 here
                        want = s.reduce(m.to_matrix(g)[None].float())[0]
                        assert_close_in_norm(got[m.name][j], want, 1e-5, msg=f"{m.name}, query {j}")


def test_rows_do_not_depend_on_batch_or_shard_size(fitted, tmp_path):
    adapter, examples, curvature = fitted
    a = GradientIndex.build(tmp_path / "a", adapter, examples, curvature, projection="random", rank=4, dtype="float32",
                            shard_size=5, batch_size=1, progress=False)
    b = GradientIndex.build(tmp_path / "b", adapter, examples, curvature, projection="random", rank=4, dtype="float32",
                            shard_size=100, batch_size=6, progress=False)
    rows_a = np.concatenate([a.store.rows(0, i)[1] for i in range(a.checkpoints[0]["n_shards"])])
    assert a.checkpoints[0]["n_shards"] == 3 and b.checkpoints[0]["n_shards"] == 1
    assert _relative(rows_a, b.store.rows(0, 0)[1]) < 1e-5


def test_checkpoint_sum_equals_over_checkpoints(tl_adapter, tokenized, tmp_path):
    """Two checkpoints of one index (the base weights and perturbed ones), each indexed with its own EK-FAC, sum as
    OverCheckpoints sums Concept Influence with a fit at each checkpoint; weights multiply."""
    adapter, examples = tl_adapter, tokenized
    base = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    with torch.no_grad():
        for p in adapter.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tuned = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    concept = _concept(adapter, examples)
    path = tmp_path / "i"
    for weights in (base, tuned):
        adapter.model.load_state_dict(weights)
        curvature = fit_curvature(adapter, examples, adapter.linear_maps(1), batch_size=4, progress=False)
        GradientIndex.build(path, adapter, examples, curvature, projection="identity", dtype="float32",
                            weight=0.5 if weights is base else 2.0, progress=False)
    index = GradientIndex(path)
    models = []
    for weights in (base, tuned):
        model = type(adapter)(copy.deepcopy(adapter.model), adapter.tokenizer)
        model.model.load_state_dict(weights)
        models.append(model)
    got = index.score(ConceptInfluence(concept, "ekfac"), models, progress=False)
    ref = OverCheckpoints(lambda: ConceptInfluence(concept, "ekfac"), [base, None], weights=[0.5, 2.0]
                          ).score(adapter, examples, batch_size=8, progress=False)
    assert got.estimator == "concept_influence[checkpoints]" and len(index.checkpoints) == 2
    assert _relative(got.values, ref.values) < 1e-4


def test_empirical_curvature_is_the_damped_second_moment_of_the_rows(fitted, tmp_path):
    adapter, examples, curvature = fitted
    index = GradientIndex.build(tmp_path / "i", adapter, examples, curvature, projection="eigen", rank=2,
                                dtype="float32", progress=False)
    concept = _concept(adapter, examples, layer=0, k=1)
    got = index.score(ConceptInfluence(concept, curvature), adapter, curvature="empirical", progress=False).values[:, 0]
    spaces = index.store.load_spaces(0)
    rows = torch.from_numpy(np.array(index.store.rows(0, 0)[1])).double()
    grads = concept.gradient(adapter, adapter.linear_maps(0))
    ref, start = torch.zeros(len(examples), dtype=torch.float64), 0
    for s in spaces:
        x = rows[:, start:start + s.dim] / s.scale
        start += s.dim
        if s.name in grads:
            v = s.reduce(grads[s.name].double()).flatten()
            ref -= x @ torch.linalg.solve(damped(x.T @ x / len(x), 0.1), v)
    assert _relative(got, ref.numpy()) < 1e-4
    moments = empirical_moments(index.store, 0)
    assert (index.store.checkpoint_dir(0) / "empirical.safetensors").is_file() and len(moments) == len(spaces)


def test_bad_queries_and_models_are_named(fitted, tmp_path, tokenizer):
    adapter, examples, _ = fitted
    curvature = fit_curvature(adapter, examples, adapter.linear_maps(0), batch_size=4, progress=False)
    index = GradientIndex.build(tmp_path / "i", adapter, examples, curvature, rank=2, progress=False)
    deeper = _concept(adapter, examples, layer=1)
    with pytest.raises(GradientIndexError, match=r"blocks.1.hook_resid_post needs the maps of blocks 0..1, the index "
                                                 r"holds blocks 0..0"):
        index.score(ConceptInfluence(deeper, "ekfac"), adapter, progress=False)
    other = type(adapter)(copy.deepcopy(adapter.model), adapter.tokenizer)
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    with pytest.raises(GradientIndexError, match="was indexed on model .*, this model's fingerprint is"):
        index.score(ConceptInfluence(_concept(adapter, examples, layer=0), "ekfac"), other, progress=False)
    with pytest.raises(GradientIndexError, match="other settings \\(rank: 2 -> 3\\)"):
        GradientIndex.build(tmp_path / "i", adapter, examples, curvature, rank=3, progress=False)
    with pytest.raises(GradientIndexError, match="not a gradient index"):
        GradientIndex(tmp_path)


def test_a_truncated_shard_is_named_and_rebuilt(fitted, tmp_path):
    adapter, examples, _ = fitted
    curvature = fit_curvature(adapter, examples, adapter.linear_maps(0), batch_size=4, progress=False)
    index = GradientIndex.build(tmp_path / "i", adapter, examples, curvature, rank=2, shard_size=5, progress=False)
    concept = _concept(adapter, examples, layer=0)
    before = index.score(ConceptInfluence(concept, "ekfac"), adapter, progress=False)
    shard = index.store.shard_path(0, 1)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(GradientIndexError, match=r"shard-000001.safetensors: truncated or unreadable shard"):
        index.score(ConceptInfluence(concept, "ekfac"), adapter, progress=False)
    manifest = json.loads((tmp_path / "i" / "index.json").read_text())
    manifest["checkpoints"][0]["finished"] = None  # as a build killed before its end leaves it
    (tmp_path / "i" / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(GradientIndexError, match="checkpoint 0 is not finished"):
        GradientIndex(tmp_path / "i").score(ConceptInfluence(concept, "ekfac"), adapter, progress=False)
    index = GradientIndex.build(tmp_path / "i", adapter, examples, curvature, rank=2, shard_size=5, progress=False)
    np.testing.assert_array_equal(index.score(ConceptInfluence(concept, "ekfac"), adapter, progress=False).values,
                                  before.values)


def test_rank_unset_is_the_largest_that_fits_the_budget(fitted, tmp_path):
    adapter, examples, curvature = fitted
    index = GradientIndex.build(tmp_path / "i", adapter, examples[:2], curvature, budget=3000, progress=False)
    rank, maps = index.store.manifest["rank"], adapter.linear_maps()
    assert index.bytes_per_example <= 3000
    assert 2 * sum(min(rank + 1, m.shape[0]) * min(rank + 1, m.shape[1]) for m in maps) > 3000



def test_wide_rows_are_read_in_chunks_that_fit_the_buffer(fitted, tmp_path, monkeypatch):
    """Rows as wide as an uncompressed gradient are read a few at a time (the buffer stays under BUFFER_BYTES) and score
    as when they are read a shard at a time."""
    from concept_influence.index import store as store_module

    adapter, examples, curvature = fitted
    index = GradientIndex.build(tmp_path / "wide", adapter, examples, curvature, projection="identity", dtype="float32",
                                shard_size=6, progress=False)
    est = ConceptInfluence(_concept(adapter, examples), curvature)
    whole = index.score(est, adapter, progress=False).values
    dim = index.store.dim
    monkeypatch.setattr(store_module, "BUFFER_BYTES", 4 * dim * 2 + 3)  # two rows fit, not three
    sizes = [len(ids) for ids, rows in index.store.iter_rows(0, dim) if rows.shape == (len(ids), dim)]
    assert sum(sizes) == len(examples) and max(sizes) == 2
    assert _relative(index.score(est, adapter, progress=False).values, whole) < 1e-6
