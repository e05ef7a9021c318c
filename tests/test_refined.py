"""EK-FAC refined by preconditioned conjugate gradient: the Fisher products equal the explicit matrices, 0 steps is
EK-FAC, enough steps the exact damped inverse, K columns K separate runs, and the scoring engine uses it as it is."""

import pytest
import torch
from test_curvature import _exact_fisher, weight_grads

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import CurvatureError, GaussNewton, RefinedCurvature, fit_curvature, registry
from concept_influence.data import collate
from concept_influence.estimators import ConceptInfluence
from concept_influence.gradients import sample_labels
from concept_influence.models import per_token_mean_loss
from concept_influence.toy.small_model import build_small_model
from probes import ConceptDirection


@pytest.fixture
def tiny(tokenizer):
    """A one-block d_model=8 TransformerLens model (768 weights in its six maps) in float64."""
    adapter = build_small_model(tokenizer, n_layers=1, d_model=8, n_heads=2, n_ctx=64, seed=0)
    adapter.model.double()
    adapter.model.cfg.dtype = torch.float64  # (TransformerLens casts some steps to its cfg's dtype)
    return adapter


def _flat(vectors, maps) -> torch.Tensor:
    """``{map: [K, d_out, d_in]}`` as ``[K, P]``, maps in order."""
    return torch.cat([vectors[m.name].flatten(1) for m in maps], dim=1)


def _random(maps, k, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return {m.name: torch.randn(k, *m.shape, generator=gen, dtype=dtype) for m in maps}


def test_expected_labels_give_the_exact_fisher(tiny, tokenized):
    maps = tiny.linear_maps(0)
    v = _random(maps, 3)
    got = _flat(GaussNewton(tiny, tokenized, maps, batch_size=5)(v), maps)
    expected = _flat(v, maps) @ _exact_fisher(tiny, tokenized, maps)  # (symmetric)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize("labels", ["sampled", "data"])
def test_sampled_and_data_labels_give_the_fits_per_example_gradients(tiny, tokenized, labels):
    """``mean_z G_z ⟨G_z, v⟩`` with ``G_z`` from autograd on each unpadded example, labels as the EK-FAC fit's."""
    maps = tiny.linear_maps(0)
    per_example = []
    for ex in tokenized:
        batch = collate([ex], tiny.pad_token_id)
        logits = tiny.logits(batch)
        targets = sample_labels(logits.detach(), batch, seed=3) if labels == "sampled" else None
        grads = weight_grads(maps, per_token_mean_loss(logits, batch, targets=targets).sum())
        per_example.append(torch.cat([grads[m.name].reshape(-1) for m in maps]))
    g = torch.stack(per_example)  # [N, P]
    v = _random(maps, 2)
    got = _flat(GaussNewton(tiny, tokenized, maps, labels=labels, seed=3, batch_size=5)(v), maps)
    torch.testing.assert_close(got, (_flat(v, maps) @ g.T) @ g / len(tokenized), rtol=1e-9, atol=1e-12)


def test_enough_steps_give_the_exact_damped_inverse_and_the_residual_falls(tiny, tokenized):
    maps = tiny.linear_maps(0)
    ekfac = fit_curvature(tiny, tokenized, maps, batch_size=5, progress=False)
    damping = torch.cat([torch.full((m.shape[0] * m.shape[1],), ekfac.dampings[m.name], dtype=torch.float64)
                         for m in maps])
    v = _random(maps, 2)
    exact = torch.linalg.solve(_exact_fisher(tiny, tokenized, maps) + torch.diag(damping), _flat(v, maps).T).T
    refined = RefinedCurvature(ekfac, tiny, tokenized, steps=250, maps=maps, batch_size=12)
    got = _flat(refined.precondition(v), maps)
    assert ((got - exact).norm(dim=1) / exact.norm(dim=1)).max() < 1e-5
    res = refined.last_residuals
    print("residual after 0, 10, 50, 100, 250 steps:", res[[0, 10, 50, 100, 250]].T.tolist(),
          "largest rise in one step:", float((res[1:] / res[:-1]).max()))
    assert res.shape == (251, 2) and (res[-1] < 1e-6 * res[0]).all()
    worst = res[:250].reshape(10, 25, 2).amax(1)  # the largest of every 25 steps
    assert (worst[1:] < worst[:-1]).all(), "CG's residual need not fall at every step, but falls over 25"
    ekfac_error = ((_flat(ekfac.precondition(v), maps) - exact).norm(dim=1) / exact.norm(dim=1)).min()
    assert ekfac_error > 1e-2, "EK-FAC alone is not exact here, so the steps did the work"


def test_zero_steps_is_ekfac_and_k_columns_are_k_runs(tokenizer, tokenized):
    adapter = build_small_model(tokenizer, n_layers=1, d_model=16, n_heads=2, n_ctx=64, seed=1)  # float32
    maps = adapter.linear_maps(0)
    ekfac = fit_curvature(adapter, tokenized, maps, batch_size=6, progress=False)
    v = _random(maps, 3, dtype=torch.float32)
    zero = RefinedCurvature(ekfac, adapter, tokenized, steps=0, labels="sampled", batch_size=6)
    got, expected = zero.precondition(v), ekfac.precondition(v)
    assert all(torch.equal(got[name], expected[name]) for name in v)
    assert zero.last_residuals.shape == (1, 3) and (zero.last_residuals > 0).all()

    refined = RefinedCurvature(ekfac, adapter, tokenized, steps=4, labels="sampled", batch_size=6)
    together, residuals = refined.precondition(v), refined.last_residuals
    for k in range(3):
        alone = refined.precondition({name: x[k:k + 1] for name, x in v.items()})
        for name in v:
            torch.testing.assert_close(together[name][k:k + 1], alone[name], rtol=1e-5,
                                       atol=1e-6 * float(alone[name].abs().max()))
        torch.testing.assert_close(residuals[:, k:k + 1], refined.last_residuals, rtol=1e-5, atol=1e-9)
    iterates = [x for x, _ in refined.iterates(v)]
    assert len(iterates) == 5 and all(torch.equal(iterates[0][n], expected[n]) for n in v)


def test_concept_influence_scores_with_the_refined_curvature(tl_adapter, tokenized):
    direction = ConceptDirection(torch.randn(tl_adapter.d_model, generator=torch.Generator().manual_seed(0)),
                                 "blocks.0.hook_resid_post", kind="custom")
    concept = ConceptFunction.from_directions(direction, eval_examples=tokenized[:4])
    maps = tl_adapter.linear_maps(0)
    ekfac = fit_curvature(tl_adapter, tokenized, maps, batch_size=6, progress=False)
    plain = ConceptInfluence(concept, curvature=ekfac).score(tl_adapter, tokenized, batch_size=6, progress=False)
    zero = RefinedCurvature(ekfac, tl_adapter, tokenized, steps=0, maps=maps, batch_size=6)
    same = ConceptInfluence(concept, curvature=zero).score(tl_adapter, tokenized, batch_size=6, progress=False)
    assert same.metadata["curvature"] == "ekfac_cg"
    torch.testing.assert_close(torch.as_tensor(same.values), torch.as_tensor(plain.values))
    refined = RefinedCurvature(ekfac, tl_adapter, tokenized, steps=3, maps=maps, batch_size=6)
    ConceptInfluence(concept, curvature=refined).score(tl_adapter, tokenized, batch_size=6, progress=False)
    assert refined.last_residuals.shape == (4, 1) and refined.last_residuals[-1, 0] < refined.last_residuals[0, 0]


def test_expected_labels_on_hugging_face_models_give_a_symmetric_positive_matrix(hf_adapter, tokenized):
    """Forward-mode products through the models' attention (run on the math kernel): ``⟨u, F v⟩ = ⟨F u, v⟩ > 0``."""
    maps = hf_adapter.linear_maps(0)
    u, v = _random(maps, 1, 1, torch.float32), _random(maps, 1, 2, torch.float32)
    fisher = GaussNewton(hf_adapter, tokenized[:6], maps, batch_size=3)
    fu, fv = _flat(fisher(u), maps).double(), _flat(fisher(v), maps).double()
    u, v = _flat(u, maps).double(), _flat(v, maps).double()
    torch.testing.assert_close((u * fv).sum(), (fu * v).sum(), rtol=1e-4, atol=0)
    assert (v * fv).sum() > 0 and (u * fu).sum() > 0


def test_refusals(tl_adapter, tokenized, tmp_path):
    assert "ekfac_cg" in registry.STRATEGIES and registry.passes("ekfac_cg") is None
    ekfac = fit_curvature(tl_adapter, tokenized, tl_adapter.linear_maps(0), batch_size=6, progress=False)
    refined = RefinedCurvature(ekfac, tl_adapter, tokenized, steps=1, maps=0)
    with pytest.raises(CurvatureError, match="not saved"):
        refined.save(tmp_path)
    with pytest.raises(CurvatureError, match="no curvature for map"):
        refined.precondition({"blocks.1.attn.W_Q": torch.zeros(1, 32, 32)})
    with pytest.raises(ValueError, match="labels must be one of"):
        GaussNewton(tl_adapter, tokenized, tl_adapter.linear_maps(0), labels="model")
    with pytest.raises(TypeError, match="EKFACCurvature"):
        RefinedCurvature(refined, tl_adapter, tokenized)
