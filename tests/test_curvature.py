"""Curvature: pure-tensor EK-FAC exactness, fitter statistics, comparison with the exact Fisher,
persistence, and Hugging Face models."""

import dataclasses
import json
import pickle

import pytest
import torch
from norms import assert_close_in_norm
from torch.func import functional_call, jacfwd, vmap

from concept_influence.curvature import (
    Curvature,
    CurvatureError,
    EKFACCurvature,
    IdentityCurvature,
    KroneckerEigen,
    SumStats,
    collect_covariance_stats,
    collect_eigenvalue_stats,
    covariance_sums,
    fit_curvature,
    rotated_square_sum,
)
from concept_influence.data import TokenizedExample, collate, tokenize_examples
from concept_influence.gradients import sample_labels
from concept_influence.models import per_token_mean_loss
from concept_influence.toy.small_model import build_small_model
from conftest import make_chats


def weight_grads(maps, loss) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(loss, [m.weight for m in maps])
    return {m.name: m.to_matrix(g) for m, g in zip(maps, grads)}


# ---- pure tensors -----------------------------------------------------------------------------------


def test_ekfac_is_exact_when_fisher_is_diagonal_in_kronecker_basis():
    """One token per example, ``a = Q_A (s ⊙ α_m)``, ``g = Q_S (r ⊙ β_m)`` over every sign pattern
    ``s, r ∈ {±1}`` and three positive scale profiles ``m``. All off-diagonal entries of the empirical
    Fisher ``F = mean_z vec(g aᵀ) vec(g aᵀ)ᵀ`` in the basis ``Q_S ⊗ Q_A`` are sign averages, exactly zero,
    so ``F`` is diagonal there with entries ``mean_m α²β²``: EK-FAC's ``Λ`` is exactly ``F``'s spectrum and
    its damped inverse is exact. The diagonal is not rank one across ``m``, so K-FAC is not exact."""
    torch.manual_seed(0)
    d_in, d_out = 4, 3
    q_a, _ = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64))
    q_s, _ = torch.linalg.qr(torch.randn(d_out, d_out, dtype=torch.float64))
    signs = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * (d_in + d_out))
    a_rows, g_rows = [], []
    for _ in range(3):
        alpha = torch.rand(d_in, dtype=torch.float64) * 1.5 + 0.5
        beta = torch.rand(d_out, dtype=torch.float64) * 1.5 + 0.5
        a_rows.append((signs[:, :d_in] * alpha) @ q_a.T)
        g_rows.append((signs[:, d_in:] * beta) @ q_s.T)
    a, g = torch.cat(a_rows)[:, None], torch.cat(g_rows)[:, None]  # [N, T=1, d]
    n = a.shape[0]
    mask = torch.ones(n, 1, dtype=torch.bool)

    a_sum, s_sum = covariance_sums(a, g, mask)
    kfac = KroneckerEigen.from_covariances(a_sum / n, s_sum / n)
    ekfac = kfac.with_eigenvalues(rotated_square_sum(a, g, mask, kfac) / n)

    per_example = (g[:, 0, :, None] * a[:, 0, None, :]).reshape(n, -1)  # vec(G_z), row-major
    fisher = per_example.T @ per_example / n
    rot = torch.kron(kfac.q_s, kfac.q_a)  # the basis for row-major vec
    in_basis = rot.T @ fisher @ rot
    assert (in_basis - torch.diag(in_basis.diagonal())).abs().max() < 1e-12 * in_basis.abs().max()

    damping = 0.1 * float(ekfac.eigenvalues.mean())
    v = torch.randn(5, d_out, d_in, dtype=torch.float64)
    exact = torch.linalg.solve(fisher + damping * torch.eye(d_out * d_in, dtype=torch.float64), v.reshape(5, -1).T).T
    assert_close_in_norm(ekfac.precondition(v, damping).reshape(5, -1), exact, 1e-12, dim=-1)  # float64: ~7e-15 here
    kfac_error = (kfac.precondition(v, damping).reshape(5, -1) - exact).norm() / exact.norm()
    assert kfac_error > 1e-2, "the construction should not be Kronecker-factored (K-FAC would be exact)"


def test_sum_stats_merge_and_state_dict_equal_one_pass():
    torch.manual_seed(0)
    a, g = torch.randn(6, 3, 4), torch.randn(6, 3, 2)
    mask = torch.rand(6, 3) > 0.3
    whole, shards = SumStats(), [SumStats(), SumStats()]
    for stats, sl in ((whole, slice(0, 6)), (shards[0], slice(0, 2)), (shards[1], slice(2, 6))):
        a_sum, _ = covariance_sums(a[sl], g[sl], mask[sl])
        stats.add("a", a_sum, int(mask[sl].sum()))
    merged = SumStats().merge(shards[0]).merge(shards[1])
    torch.testing.assert_close(merged.mean("a"), whole.mean("a"))
    # an all-reduce(SUM) of the state dicts is a merge
    summed = {k: shards[0].state_dict()[k] + shards[1].state_dict()[k] for k in shards[0].state_dict()}
    torch.testing.assert_close(SumStats.from_state_dict(summed).mean("a"), whole.mean("a"))
    assert SumStats.from_state_dict(summed).counts == whole.counts


def test_sum_stats_keeps_a_fresh_first_sum_without_a_copy_and_never_aliases_a_merged_shard():
    fresh, shard = torch.ones(3, 3), SumStats()
    stats = SumStats()
    stats.add("s", fresh, 2, fresh=True)
    assert stats.sums["s"].data_ptr() == fresh.data_ptr()  # (one matrix less at the peak of a pass)
    shard.add("s", torch.ones(3, 3), 1)
    merged = SumStats().merge(shard)
    merged.add("s", torch.ones(3, 3), 1)
    torch.testing.assert_close(shard.sums["s"], torch.ones(3, 3))  # the merged shard's sum is untouched
    assert merged.counts["s"] == 2 and float(merged.sums["s"][0, 0]) == 2.0


def test_padding_is_ignored_even_when_not_finite():
    torch.manual_seed(0)
    a, g = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    g[~mask] = 0  # what the backward gives at padding
    padded = a.clone()
    padded[~mask] = float("nan")
    basis = KroneckerEigen.from_covariances(*covariance_sums(a, g, mask))
    for x in (a, padded):
        sums = covariance_sums(x, g, mask) + (rotated_square_sum(x, g, mask, basis),)
        assert all(torch.isfinite(t).all() for t in sums)
    per_example = [(g[b, mask[b]].T @ a[b, mask[b]]) for b in range(3)]
    expected = sum((basis.q_s.T @ G @ basis.q_a).square() for G in per_example)
    torch.testing.assert_close(rotated_square_sum(padded, g, mask, basis), expected)
    torch.testing.assert_close(covariance_sums(padded, g, mask)[0], a[mask].T @ a[mask])


def test_sample_labels_follow_the_model_distribution():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    n = 4000
    batch = collate([TokenizedExample("toy", (0,) * (n + 1), 1)])
    logits = probs.clamp_min(1e-30).log().expand(1, n + 1, 5)
    labels = sample_labels(logits, batch, seed=0)[0]
    freq = torch.bincount(labels, minlength=5).float() / n
    assert freq[1] == 0 and freq[4] == 0
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    assert torch.equal(labels, sample_labels(logits, batch, seed=0)[0])
    assert not torch.equal(labels, sample_labels(logits, batch, seed=1)[0])


# ---- fitting on a model -----------------------------------------------------------------------------


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_statistics_do_not_depend_on_batch_size(tl_adapter, tokenized, fisher):
    """A, S and the eigenvalue correction Λ (accumulated in one fixed eigenbasis: eigenvectors of nearly
    equal eigenvalues are ill-conditioned, so fits could legitimately differ in basis) agree for batch sizes
    1, 5 and 12; for the true Fisher this needs labels sampled per example, independent of the batch."""
    kw = dict(fisher=fisher, seed=3, progress=False)
    covs = [collect_covariance_stats(tl_adapter, tokenized, batch_size=bs, **kw) for bs in (1, 5, 12)]
    bases = {m.name: KroneckerEigen.from_covariances(covs[0].mean(f"{m.name}/a"), covs[0].mean(f"{m.name}/s"))
             for m in tl_adapter.linear_maps()}
    eigs = [collect_eigenvalue_stats(tl_adapter, tokenized, bases, batch_size=bs, **kw) for bs in (1, 5, 12)]
    for stats in (covs, eigs):
        for key, ref in stats[0].sums.items():
            for other in stats[1:]:
                assert other.counts[key] == stats[0].counts[key]
                torch.testing.assert_close(other.mean(key), stats[0].mean(key), rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_eigenvalue_correction_matches_brute_force_per_example_gradients(tl_adapter, tokenized):
    """Λ from the batched fit (batch 5, padded) equals ``mean_z (Q_Sᵀ G_z Q_A)²`` with ``G_z`` the autograd
    gradient of each example's own sampled-label loss, computed one unpadded example at a time."""
    check_eigenvalue_correction(tl_adapter, tokenized, tl_adapter.linear_maps(0))


def check_eigenvalue_correction(adapter, examples, maps) -> None:
    """Λ of ``maps`` fitted in batches of 5 (padded, labels sampled with seed 1) against ``mean_z (Q_Sᵀ G_z Q_A)²``
    from autograd on each unpadded example's own sampled-label loss."""
    curv = fit_curvature(adapter, examples, maps, batch_size=5, seed=1, progress=False)
    expected = {m.name: 0 for m in maps}
    for ex in examples:
        batch = collate([ex], adapter.pad_token_id)
        logits = adapter.logits(batch)
        loss = per_token_mean_loss(logits, batch, targets=sample_labels(logits.detach(), batch, seed=1)).sum()
        for name, grad in weight_grads(maps, loss).items():
            f = curv.factors[name]
            expected[name] = expected[name] + (f.q_s.T @ grad @ f.q_a).square() / len(examples)
    for name in expected:
        torch.testing.assert_close(curv.factors[name].eigenvalues, expected[name], rtol=1e-3,
                                   atol=1e-5 * float(expected[name].max()))


def _exact_fisher(adapter, examples, maps) -> torch.Tensor:
    """Exact ``E_z E_{y~p}[∇L(z) ∇L(z)ᵀ]`` (float64, [P, P]) for a TransformerLens model over the
    maps' weights, flattened map by map in matrix form (row-major). With logits ``= head(r_t)`` of the final
    residual ``r_t``, ``∂logit_t/∂θ = M_t R_t`` (``M_t = ∂head/∂r_t``, ``R_t = ∂r_t/∂θ``) and
    ``Fisher_z = (1/n_z²) Σ_t R_tᵀ M_tᵀ (diag p_t − p_t p_tᵀ) M_t R_t`` (cross-position terms vanish
    because ``E_y[∇ log p_y] = 0``)."""
    model = adapter.model
    param_names = {id(p): n for n, p in model.named_parameters()}
    names = [param_names[id(m.weight)] for m in maps]
    mats = [m.to_matrix(m.weight.detach()) for m in maps]
    sizes = [x.numel() for x in mats]
    batch = collate(examples, adapter.pad_token_id)
    loss_mask = batch.response_mask[:, 1:]

    def resid(theta):
        params = {n: m.from_matrix(x.reshape(mt.shape)) for n, m, x, mt in zip(names, maps, theta.split(sizes), mats)}
        return functional_call(model, params, (batch.input_ids,), {"stop_at_layer": model.cfg.n_layers})[:, :-1][loss_mask]

    def head(r):
        return model.unembed(model.ln_final(r[None, None]))[0, 0]

    theta = torch.cat([x.reshape(-1) for x in mats])
    with torch.no_grad():
        r = resid(theta)
        m_t = vmap(jacfwd(head))(r).double()  # [N, V, d]
        p = torch.softmax(vmap(head)(r).double(), -1)  # [N, V]
    r_t = jacfwd(resid)(theta).detach().double()  # [N, d, P]
    n_tok = loss_mask.sum(1)
    weight = (1.0 / n_tok.double() ** 2).repeat_interleave(n_tok)
    mp = torch.einsum("nvd,nv->nd", m_t, p)
    h = torch.einsum("nvd,nv,nve->nde", m_t, p, m_t) - mp[:, :, None] * mp[:, None, :]
    return torch.einsum("ndp,nde,neq->pq", r_t, h * weight[:, None, None], r_t) / len(examples)


def test_ekfac_beats_kfac_beats_identity_against_exact_fisher(tokenizer, tokenized):
    """Compared: ``(F + λI)⁻¹ v`` with ``F`` the EXACT true Fisher of the per-example loss L(z) (expectation
    over all labels, not sampled; ``= mean_z J_zᵀ H_z J_z / n_z``, i.e. the Gauss-Newton matrix of L(z)
    with each example weighted by a further ``1/n_z``, which is what the sampled estimator targets), over all
    six maps of a one-block d_model=8 TransformerLens model (768 weights), against EK-FAC, K-FAC and identity
    fitted with the sampled true Fisher (each of the 12 examples repeated 8 times under new ids, hence 8
    label draws each), all with the same absolute λ = 0.1 × mean eigenvalue of ``F``. ``v`` is the loss
    gradient of a held-out example (what influence preconditions). For a random ``v`` the identity scores
    higher (it mostly lies where damping dominates); those cosines are printed, not asserted."""
    adapter = build_small_model(tokenizer, n_layers=1, d_model=8, n_heads=2, n_ctx=64, seed=0)
    maps = adapter.linear_maps(0)
    fisher = _exact_fisher(adapter, tokenized, maps)
    damping = 0.1 * float(fisher.diagonal().mean())
    exact_inverse = torch.linalg.inv(fisher + damping * torch.eye(fisher.shape[0], dtype=torch.float64))

    repeated = [dataclasses.replace(e, id=f"{e.id}#{k}") for e in tokenized for k in range(8)]
    curvatures = {s: fit_curvature(adapter, repeated, maps, strategy=s, damping=damping, batch_size=32, progress=False)
                  for s in ("ekfac", "kfac", "identity")}

    def cosines(v: dict[str, torch.Tensor]) -> dict[str, float]:
        flat = torch.cat([v[m.name].reshape(-1).double() for m in maps])
        target = exact_inverse @ flat
        out = {}
        for s, c in curvatures.items():
            got = torch.cat([x.reshape(-1).double() for x in c.precondition(v).values()])
            out[s] = float(torch.nn.functional.cosine_similarity(got, target, dim=0))
        return out

    held_out = tokenize_examples(make_chats(3, seed=7), tokenizer, max_length=64)
    for ex in held_out:
        cos = cosines(weight_grads(maps, adapter.per_example_loss(collate([ex], adapter.pad_token_id)).sum()))
        print(f"loss gradient of {ex.id}: cosine to exact (F+λI)⁻¹v {cos}")
        assert cos["ekfac"] > cos["kfac"] > cos["identity"]
    gen = torch.Generator().manual_seed(0)
    print("random v:", cosines({m.name: torch.randn(m.shape, generator=gen) for m in maps}))


def test_non_finite_loss_names_the_example(tl_adapter, tokenized):
    counts = {}
    for ex in tokenized:
        for tok in set(ex.input_ids):
            counts.setdefault(tok, []).append(ex.id)
    tok, (bad_id,) = next((t, ids) for t, ids in counts.items() if len(ids) == 1)
    with torch.no_grad():
        tl_adapter.model.embed.W_E[tok] = float("nan")
    with pytest.raises(CurvatureError, match=rf"non-finite loss for example\(s\) {bad_id}"):
        fit_curvature(tl_adapter, tokenized, maps=0, batch_size=4, progress=False)


def test_precondition_checks_names_and_shapes_and_keeps_leading_dims(tl_adapter, tokenized):
    curv = fit_curvature(tl_adapter, tokenized, maps=0, strategy="kfac", progress=False)
    for name, f in curv.factors.items():
        assert curv.dampings[name] == pytest.approx(0.1 * float(f.eigenvalues.mean()))
    assert set(curv.with_damping(0.3).dampings.values()) == {0.3}
    name = curv.map_names[0]
    v = torch.randn(3, *curv.shapes[name])
    assert curv.precondition({name: v})[name].shape == v.shape
    with pytest.raises(CurvatureError, match="no curvature for map 'blocks.1.attn.W_Q'"):
        curv.precondition({"blocks.1.attn.W_Q": v})
    with pytest.raises(CurvatureError, match="expected"):
        curv.precondition({name: v[..., :-1]})
    with pytest.raises(ValueError, match="strategy"):
        fit_curvature(tl_adapter, tokenized, strategy="diagonal")
    with pytest.raises(ValueError, match="damping"):
        fit_curvature(tl_adapter, tokenized, damping=0.0)


# ---- persistence ------------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this creates a marker file: a loader that unpickles would be caught."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "identity"])
def test_save_load_round_trip(tl_adapter, tokenized, tmp_path, strategy):
    curv = fit_curvature(tl_adapter, tokenized, maps=0, strategy=strategy, fisher="empirical", damping_factor=0.05,
                         progress=False)
    curv.save(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["curvature.json", "curvature.safetensors"]
    config = json.loads((tmp_path / "c" / "curvature.json").read_text())
    assert config["strategy"] == strategy and config["fingerprint"] == tl_adapter.fingerprint()
    assert [m["name"] for m in config["maps"]] == curv.map_names
    loaded = Curvature.load(tmp_path / "c", tl_adapter)
    assert type(loaded) is type(curv) and loaded.shapes == curv.shapes and loaded.fisher == curv.fisher
    if strategy != "identity":
        assert loaded.damping_factor == 0.05 and loaded.dampings == curv.dampings
        for name, f in curv.factors.items():
            for field in dataclasses.fields(f):
                assert torch.equal(getattr(loaded.factors[name], field.name), getattr(f, field.name))
    grads = {m.name: torch.randn(m.shape) for m in tl_adapter.linear_maps(0)}
    for name, v in curv.precondition(grads).items():
        assert torch.equal(loaded.precondition(grads)[name], v)


def test_load_refuses_other_model_and_pickle(tl_adapter, tokenizer, tokenized, tmp_path):
    curv = fit_curvature(tl_adapter, tokenized, maps=0, strategy="kfac", progress=False)
    curv.save(tmp_path / "c")
    other = build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=64, seed=1)
    with pytest.raises(CurvatureError) as err:
        Curvature.load(tmp_path / "c", other)
    assert tl_adapter.fingerprint() in str(err.value) and other.fingerprint() in str(err.value)
    with pytest.raises(CurvatureError, match="not a IdentityCurvature"):
        IdentityCurvature.load(tmp_path / "c")

    marker = tmp_path / "unpickled"
    (tmp_path / "c" / "curvature.safetensors").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CurvatureError, match="not a readable safetensors file"):
        Curvature.load(tmp_path / "c", tl_adapter)
    assert not marker.exists()


# ---- Hugging Face -----------------------------------------------------------------------------------


def test_hf_models(hf_adapter, tokenized):
    maps = hf_adapter.linear_maps()
    curv = fit_curvature(hf_adapter, tokenized, maps, batch_size=4, progress=False)
    assert isinstance(curv, EKFACCurvature) and curv.map_names == [m.name for m in maps]
    batch = collate(tokenized[:3], hf_adapter.pad_token_id)
    grads = weight_grads(maps, hf_adapter.per_example_loss(batch).sum())
    for m in maps:
        f = curv.factors[m.name]
        d_out, d_in = m.shape
        assert curv.shapes[m.name] == m.shape
        assert f.q_a.shape == (d_in, d_in) and f.q_s.shape == (d_out, d_out) and f.eigenvalues.shape == (d_out, d_in)
        assert torch.isfinite(f.eigenvalues).all() and (f.eigenvalues >= 0).all()
    identity = fit_curvature(hf_adapter, tokenized, maps, strategy="identity", progress=False)
    for name, out in identity.precondition(grads).items():
        assert out is grads[name]
    for name, out in curv.precondition(grads).items():
        assert out.shape == grads[name].shape and torch.isfinite(out).all()
