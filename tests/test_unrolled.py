"""Unrolled (SOURCE) preconditioning against brute-force unrolled SGD on a quadratic loss, and against Bergson."""

import dataclasses

import numpy as np
import pytest
import torch
from norms import assert_close_in_norm
from scipy.stats import spearmanr

from concept_influence.curvature import (
    Curvature,
    EKFACCurvature,
    Horizon,
    KroneckerEigen,
    UnrolledCurvature,
    fisher_step_scales,
    segment_horizons,
)
from conftest import _hf_model, make_chats


def _kronecker(d_out=5, d_in=4, seed=0) -> KroneckerEigen:
    """A random EK-FAC basis with random positive corrected eigenvalues (float64)."""
    g = torch.Generator().manual_seed(seed)
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    q_s = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))[0]
    basis = KroneckerEigen.from_eigen(q_a, torch.rand(d_in, generator=g, dtype=torch.float64),
                                      q_s, torch.rand(d_out, generator=g, dtype=torch.float64))
    return basis.with_eigenvalues(torch.rand(d_out, d_in, generator=g, dtype=torch.float64) * 3)


def _hessian_apply(basis: KroneckerEigen, w: torch.Tensor) -> torch.Tensor:
    """H[W] for the quadratic whose Hessian is exactly the EK-FAC matrix Q (Λ) Qᵀ."""
    return basis.q_s @ ((basis.q_s.T @ w @ basis.q_a) * basis.eigenvalues) @ basis.q_a.T


def _sgd_response(basis, rates, g_z, w0, w_star, hessian=_hessian_apply):
    """Brute force: run SGD on ½(W−W*)ᵀH(W−W*) + ε⟨G_z, W⟩ at ε = 0 and ε = 1 and return the difference of the final
    weights (exact: everything is linear in ε)."""
    finals = []
    for eps in (0.0, 1.0):
        w = w0.clone()
        for rate in rates:
            w = w - rate * (hessian(basis, w - w_star) + eps * g_z)
        finals.append(w)
    return finals[1] - finals[0]


@pytest.mark.parametrize("rates", [[0.05] * 40, list(np.linspace(0.2, 0.0, 30, endpoint=False)), [0.3] * 3 + [0.01] * 7])
def test_unrolled_filter_equals_brute_force_sgd_on_a_quadratic(rates):
    basis = _kronecker()
    g = torch.Generator().manual_seed(1)
    g_z, w0, w_star, q = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(4))
    moved = _sgd_response(basis, rates, g_z, w0, w_star)
    curvature = UnrolledCurvature({"w": basis}, Horizon(tuple(rates)), form="discrete")
    predicted = -curvature.precondition({"w": g_z})["w"]
    torch.testing.assert_close(predicted, moved, rtol=1e-5, atol=1e-9)
    # the score a query q gives the example: ⟨q, change of W per unit up-weighting⟩
    assert float((q * predicted).sum()) == pytest.approx(float((q * moved).sum()), rel=1e-5)


def test_propagation_chains_two_segments_exactly():
    """Two segments with different curvatures: the change made in the first decays through the second."""
    first, second = _kronecker(seed=2), _kronecker(seed=3)
    g = torch.Generator().manual_seed(4)
    g_z, w0, q = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    rates1, rates2 = [0.1] * 10, [0.05] * 20
    finals = []
    for eps in (0.0, 1.0):
        w = w0.clone()
        for rate in rates1:
            w = w - rate * (_hessian_apply(first, w) + eps * g_z)
        for rate in rates2:
            w = w - rate * (_hessian_apply(second, w) + eps * g_z)
        finals.append(w)
    moved = float((q * (finals[1] - finals[0])).sum())
    seg1 = UnrolledCurvature({"w": first}, Horizon(tuple(rates1)), form="discrete")
    seg2 = UnrolledCurvature({"w": second}, Horizon(tuple(rates2)), form="discrete")
    # SOURCE: the query of the end, carried back through the second segment for the first one's contribution
    q_back = seg2.propagate({"w": q})["w"]  # Qᵀ-symmetric operators: ⟨q, S r g⟩ = ⟨S q, r g⟩
    predicted = (-float((q * seg2.precondition({"w": g_z})["w"]).sum())
                 - float((q_back * seg1.precondition({"w": g_z})["w"]).sum()))
    assert predicted == pytest.approx(moved, rel=1e-9)


def test_continuous_form_limits():
    h = Horizon.constant(0.01, 100)
    sigma = torch.tensor([0.0, 1e-9, 1e-3, 1.0, 1e4], dtype=torch.float64)
    r = h.filter(sigma)
    assert r[0] == pytest.approx(h.total) and r[1] == pytest.approx(h.total, rel=1e-6)  # small σ: the horizon
    assert r[-1] == pytest.approx(1e-4)  # large σ: the influence function's 1/σ
    assert torch.all(r <= h.total) and torch.all(r > 0)
    # discrete and continuous agree where every step is small
    small = Horizon.constant(1e-4, 1000)
    torch.testing.assert_close(small.filter(sigma[:4], "discrete"), small.filter(sigma[:4]), rtol=1e-3, atol=0)


def test_segment_horizons_split_every_step_once():
    rates = [float(i) for i in range(1, 11)]
    parts = segment_horizons([0, 4, 10], rates)
    assert [p.learning_rates for p in parts] == [(1.0, 2.0), (3.0, 4.0, 5.0, 6.0, 7.0), (8.0, 9.0, 10.0)]
    assert sum(p.total for p in parts) == sum(rates)
    with pytest.raises(ValueError, match="increasing"):
        segment_horizons([4, 0], rates)
    with pytest.raises(ValueError, match="only 10 learning rates"):
        segment_horizons([0, 12], rates)


def test_unrolled_save_load_and_scales(tmp_path):
    basis = _kronecker()
    ekfac = EKFACCurvature({"w": basis.__class__(*(t.float() for t in (basis.q_a, basis.lambda_a, basis.q_s,
                                                                        basis.lambda_s, basis.eigenvalues)))})
    unrolled = UnrolledCurvature.from_curvature(ekfac, Horizon.constant(0.02, 50), step_scales={"w": 3.0})
    loaded = Curvature.load(unrolled.save(tmp_path / "c"))
    assert isinstance(loaded, UnrolledCurvature) and loaded.step_scales == {"w": 3.0}
    v = torch.randn(2, 5, 4)
    torch.testing.assert_close(loaded.precondition({"w": v})["w"], unrolled.precondition({"w": v})["w"])
    # a step scale multiplies the horizon: the same as scaling the learning rates
    scaled = UnrolledCurvature.from_curvature(ekfac, Horizon.constant(0.06, 50))
    torch.testing.assert_close(scaled.precondition({"w": v})["w"], unrolled.precondition({"w": v})["w"], rtol=1e-5, atol=1e-7)
    assert fisher_step_scales(ekfac, 16)["w"] == pytest.approx((float(basis.eigenvalues.mean()) / 16) ** -0.5, rel=1e-5)


def test_filter_agrees_with_bergsons_approximate_unrolling():
    """Bergson's SOURCE pipeline applies f_segment(ηK)(σ) = (1 − exp(−ηKσ))/σ per segment and carries queries back
    with f_backward(ηK)(σ) = exp(−ηKσ): the same functions as the continuous form here."""
    math = pytest.importorskip("bergson.approx_unrolling.approx_unrolling_math")
    sigma = torch.logspace(-6, 3, 50, dtype=torch.float64)
    h = Horizon(tuple(np.linspace(2e-3, 0, 75, endpoint=False)))
    torch.testing.assert_close(h.filter(sigma), math.f_segment(h.total)(sigma), rtol=1e-12, atol=0)
    torch.testing.assert_close(h.decay(sigma), math.f_backward(h.total)(sigma), rtol=1e-12, atol=0)


# ---- the estimator over checkpoints -----------------------------------------------------------------------------

HOOK = "blocks.1.hook_resid_post"


def _concept(adapter, tokenized):
    from concept_influence.concepts import ConceptFunction
    from probes import ConceptDirection

    torch.manual_seed(0)
    return ConceptFunction.from_directions(ConceptDirection(torch.randn(adapter.d_model), HOOK, kind="custom"),
                                           eval_examples=tokenized[:3], reduction="last_prompt")


def test_source_at_one_checkpoint_is_concept_influence_with_the_unrolled_curvature(tl_adapter, tokenized):
    from concept_influence.curvature import fit_curvature
    from concept_influence.estimators import ConceptInfluence, SourceInfluence

    concept = _concept(tl_adapter, tokenized)
    horizon = Horizon.constant(0.5, 20)
    source = SourceInfluence(concept, [None], [horizon], step_scales=None).score(tl_adapter, tokenized, batch_size=4,
                                                                                   progress=False)
    maps = tl_adapter.linear_maps(max_block=1)
    unrolled = UnrolledCurvature.from_curvature(fit_curvature(tl_adapter, tokenized, maps, batch_size=4, progress=False),
                                                horizon)
    direct = ConceptInfluence(concept, unrolled).score(tl_adapter, tokenized, batch_size=4, progress=False)
    np.testing.assert_allclose(source.values, direct.values, rtol=1e-4, atol=1e-6 * np.abs(direct.values).max())
    assert source.metadata["stability"]["chosen"] == "concept_influence[source]"


def test_source_over_checkpoints_chains_and_reports_its_parts(tl_adapter, tokenized):
    from concept_influence.estimators import SourceInfluence

    concept = _concept(tl_adapter, tokenized)
    gen = torch.Generator().manual_seed(5)
    earlier = {k: v + 0.05 * torch.randn(v.shape, generator=gen) * v.std()
               for k, v in tl_adapter.model.state_dict().items() if v.is_floating_point() and v.ndim == 2}
    before = {k: v.clone() for k, v in tl_adapter.model.state_dict().items()}
    horizons = segment_horizons([0, 10], [0.1] * 20)
    estimator = SourceInfluence(concept, [earlier, None], horizons)
    scores = estimator.score(tl_adapter, tokenized, batch_size=4, progress=False)
    assert set(estimator.parts_) == {"00 weights given in memory", "01 the model's own weights"}
    np.testing.assert_allclose(sum(estimator.parts_.values()), scores.column(0), rtol=1e-10)
    report = estimator.stability_
    assert {"horizon x0.1", "horizon x10", "identity"} <= set(report.agreement)
    assert scores.metadata["parts_spearman"]["00 weights given in memory"]["00 weights given in memory"] == pytest.approx(1)
    for k, v in tl_adapter.model.state_dict().items():  # the model's own weights are back
        torch.testing.assert_close(v, before[k])
    # without chaining the earlier part uses the concept's gradient at its own weights: a different score
    local = SourceInfluence(concept, [earlier, None], horizons, chain=False).score(tl_adapter, tokenized, batch_size=4,
                                                                                    progress=False)
    assert not np.allclose(local.values, scores.values)
    with pytest.raises(ValueError, match="one horizon per checkpoint"):
        SourceInfluence(concept, [earlier, None], horizons[:1])


def test_source_scores_the_behaviours_own_ranking_over_the_checkpoints_and_its_union_with_the_concepts(
        tl_adapter, tokenized):
    from concept_influence.estimators import GradDot, SourceInfluence
    from concept_influence.models import load_checkpoint
    from concept_influence.stability import union_ranking

    concept = _concept(tl_adapter, tokenized)
    gen = torch.Generator().manual_seed(5)
    own = {k: v.clone() for k, v in tl_adapter.model.state_dict().items()}
    earlier = {k: v + 0.05 * torch.randn(v.shape, generator=gen) * v.std()
               for k, v in own.items() if v.is_floating_point() and v.ndim == 2}
    horizons = segment_horizons([0, 10], [0.1] * 20)
    estimator = SourceInfluence(concept, [earlier, None], horizons, behaviour=tokenized[:3])
    scores = estimator.score(tl_adapter, tokenized, batch_size=4, progress=False)

    class ConceptMapsGradDot(GradDot):  # classic gradient-dot over the concept's maps
        def tracked_maps(self, adapter):
            return adapter.linear_maps(max_block=concept.layer)

    expected = ConceptMapsGradDot(tokenized[:3]).score(tl_adapter, tokenized, progress=False).column(0)
    load_checkpoint(tl_adapter, earlier)
    expected = expected + ConceptMapsGradDot(tokenized[:3]).score(tl_adapter, tokenized, progress=False).column(0)
    tl_adapter.model.load_state_dict(own)
    np.testing.assert_allclose(estimator.behaviour_, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    report = estimator.stability_
    assert report.kinds["behaviour"] == "behaviour"
    np.testing.assert_array_equal(estimator.union_, union_ranking(scores.column(0), estimator.behaviour_))
    assert scores.metadata["stability"]["agreement"]["behaviour"] == report.agreement["behaviour"]


def _bergson_source_scores(run, adapter, examples, checkpoint_dirs, lr_times_steps, query):
    """Bergson's ``approx_unrolling_pipeline`` end to end, in process (world size 1, CPU): EK-FAC (empirical Fisher)
    per segment of one checkpoint, ``query`` (``{Bergson module: [d_out, d_in]}``, at the last checkpoint) walked
    back with ``f_backward``, ``f_segment`` per segment, each segment scored at its checkpoint. Returns its summed
    scores and each segment's raw ``⟨F q, g⟩``."""
    from bergson.approx_unrolling.pipeline import approx_unrolling_pipeline
    from bergson.config.config import ApproxUnrollingConfig, DataConfig, HessianConfig, IndexConfig, QuerySetConfig
    from bergson.data import create_index, load_scores

    from concept_influence_benchmarks.bergson_bridge import _documents, _quiet_bergson, _response_labels

    # Bergson's covariances skip each document's last position (ours do not): one padding token without loss
    _documents(examples, [_response_labels(e) for e in examples], adapter.pad_token_id).save_to_disk(run / "data")
    adapter.tokenizer.save_pretrained(run / "tokenizer")
    rows = create_index(run / "bergson" / "query", 1, {m: g.numel() for m, g in query.items()}, np.float32)
    rows[0] = torch.cat([g.flatten() for g in query.values()]).numpy()
    rows.flush()
    index = IndexConfig(run_path=str(run / "bergson"), model=str(checkpoint_dirs[-1]), tokenizer=str(run / "tokenizer"),
                        data=DataConfig(dataset=str(run / "data")), loss_reduction="mean", token_batch_size=64)
    # its phase 1 reads the query at <run>/query whatever query.path says; the path makes step 5 leave it there
    unrolling = ApproxUnrollingConfig(checkpoints=[str(c) for c in checkpoint_dirs], segments=len(checkpoint_dirs),
                                      lr_list=list(lr_times_steps), step_size_list=[1] * len(checkpoint_dirs),
                                      query=QuerySetConfig(path=index.run_path + "/query"))
    with _quiet_bergson():
        approx_unrolling_pipeline(index, HessianConfig(method="kfac", ev_correction=True, use_dataset_labels=True),
                                  unrolling)
    segments = [np.asarray(load_scores(run / "bergson" / f"segment_{i}" / "scores_ckpt_0")[:][:, 0], dtype=np.float64)
                for i in range(len(checkpoint_dirs))]
    return np.asarray(load_scores(run / "bergson" / "scores")[:][:, 0], dtype=np.float64), segments


def test_source_scores_agree_with_bergsons_approx_unrolling(tmp_path, tokenizer):
    """SourceInfluence against Bergson's own SOURCE pipeline on a tiny Llama, 3 checkpoints of 4 SGD steps and 24
    examples, where the two compute the same quantity: one checkpoint per segment (Bergson averages covariances,
    corrected eigenvalues and scores over a segment's checkpoints), the empirical Fisher (Bergson's
    ``use_dataset_labels``; otherwise it samples its own labels) and T = 4 response tokens in every example
    (Bergson's Fisher weights an example by 1/T, ours by 1/T², so its eigenvalues are T × ours: its lr × steps is
    ours / T and its scores ours / T). Its segment scores are ``+⟨F q, g⟩``, its sum their negation. Measured:
    each segment and the sum within 1e-6 in norm, Spearman 1.0 (our horizon ÷ 10 or × 10: Spearman 0.97, 0.74)."""
    pytest.importorskip("bergson.approx_unrolling.pipeline")
    from concept_influence.concepts import ConceptFunction
    from concept_influence.curvature import CurvatureSettings
    from concept_influence.data import collate, tokenize_examples
    from concept_influence.estimators import SourceInfluence
    from concept_influence.models import HFCausalLMAdapter
    from concept_influence_benchmarks.speed_setup import map_names_by_module
    from probes import ConceptDirection

    n_response, lr, steps = 4, 1.0, [0, 2, 4]
    examples = [dataclasses.replace(e, input_ids=e.input_ids[:e.response_start + n_response])
                for e in tokenize_examples(make_chats(24), tokenizer, max_length=64)]
    assert all(e.n_response_tokens == n_response for e in examples)
    adapter = HFCausalLMAdapter(_hf_model("llama", len(tokenizer)), tokenizer)
    optimizer, weights, dirs = torch.optim.SGD(adapter.model.parameters(), lr=lr), [], []
    for step in range(steps[-1] + 1):
        if step in steps:
            weights.append({k: v.detach().clone() for k, v in adapter.model.state_dict().items()})
            dirs.append(tmp_path / f"step_{step}")
            adapter.model.save_pretrained(dirs[-1])
        if step < steps[-1]:
            optimizer.zero_grad()
            adapter.per_example_loss(collate(examples, adapter.pad_token_id)).mean().backward()
            optimizer.step()
    horizons = segment_horizons(steps, [lr] * steps[-1])
    direction = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))
    concept = ConceptFunction.from_directions(ConceptDirection(direction, HOOK), eval_examples=examples[:4])
    estimator = SourceInfluence(concept, weights, horizons, fit=CurvatureSettings(fisher="empirical"), step_scales=None)
    ours = estimator.score(adapter, examples, batch_size=8, progress=False).column(0)

    query = concept.gradient(adapter, adapter.linear_maps(concept.layer), batch_size=8)  # at the last checkpoint
    modules = map_names_by_module(adapter, concept.layer, adapter.model.base_model)
    total, segments = _bergson_source_scores(tmp_path, adapter, examples, dirs, [h.total / n_response for h in horizons],
                                             {m: query[name][0] for m, name in modules.items()})
    for part, theirs in zip(estimator.parts_.values(), segments):
        assert_close_in_norm(-n_response * theirs, part, 1e-5)
    assert spearmanr(ours, total).statistic >= 0.99
    assert_close_in_norm(n_response * total, ours, 1e-5)


@pytest.mark.parametrize("projection", ["eigen", "identity"])
def test_the_index_scores_with_the_unrolled_curvature(tl_adapter, tokenized, tmp_path, projection):
    """Declaring an eigenbasis is all the index needs: uncompressed, it gives Concept Influence with the unrolled
    filter; the random projection, which restricts a damped inverse, is refused by name."""
    from concept_influence.curvature import fit_curvature
    from concept_influence.estimators import ConceptInfluence
    from concept_influence.index import GradientIndex
    from concept_influence.index.subspace import make_spaces

    maps = tl_adapter.linear_maps(max_block=1)
    unrolled = UnrolledCurvature.from_curvature(fit_curvature(tl_adapter, tokenized, maps, batch_size=4, progress=False),
                                                Horizon.constant(0.5, 20))
    index = GradientIndex.build(tmp_path / "i", tl_adapter, tokenized, unrolled, projection=projection, rank=10**6,
                                dtype="float32", progress=False)
    estimator = ConceptInfluence(_concept(tl_adapter, tokenized), unrolled)
    ref = estimator.score(tl_adapter, tokenized, batch_size=4, progress=False).values
    got = index.score(estimator, tl_adapter, progress=False).values
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    with pytest.raises(ValueError, match="has_eigenbasis and has_damping .*; unrolled does not"):
        make_spaces("random", 4, maps, unrolled)

def test_learning_rates_from_a_trainer_state(tmp_path):
    import json

    from concept_influence.curvature import CurvatureError, learning_rates_from_trainer_state

    path = tmp_path / "trainer_state.json"
    log = [{"step": 2, "learning_rate": 4e-4, "loss": 1.0}, {"step": 4, "learning_rate": 2e-4}, {"step": 4, "eval_loss": 1}]
    path.write_text(json.dumps({"global_step": 5, "log_history": log}))
    assert learning_rates_from_trainer_state(path) == [4e-4, 4e-4, 2e-4, 2e-4, 2e-4]
    assert [h.total for h in segment_horizons([0, 2, 5], learning_rates_from_trainer_state(path))] == \
        pytest.approx([4e-4, 6e-4, 4e-4])
    path.write_text(json.dumps({"global_step": 5, "log_history": [{"step": 1, "loss": 2.0}]}))
    with pytest.raises(CurvatureError, match="no learning rate in its log_history"):
        learning_rates_from_trainer_state(path)
