"""The row encoder: exact when the features determine the rows, the index's scores recovered when it interpolates,
a bit-exact save/load, its storage, use as a retrieval first stage, and bad input as one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import fit_curvature
from concept_influence.encoder import Codes, EncoderError, RowEncoder, _principal_directions, fit_linear_codes
from concept_influence.estimators import ConceptInfluence
from concept_influence.index import GradientIndex
from concept_influence.retrieval import array_scorer, certified_retrieval
from concept_influence.toy.small_model import build_small_model
from probes import ConceptDirection


@pytest.fixture(scope="module")
def setup(tokenizer, tokenized, tmp_path_factory):
    adapter = build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=64, seed=0)
    curvature = fit_curvature(adapter, tokenized, batch_size=4, progress=False)
    index = GradientIndex.build(tmp_path_factory.mktemp("enc") / "index", adapter, tokenized, curvature, rank=4,
                                dtype="float32", progress=False)
    direction = ConceptDirection(torch.randn(32, generator=torch.Generator().manual_seed(0)), "blocks.1.hook_resid_post")
    estimator = ConceptInfluence(ConceptFunction.from_directions(direction, eval_examples=tokenized[:4]), curvature)
    return adapter, tokenized, index, estimator


def _fit(setup, **changes):
    adapter, examples, index, _ = setup
    options = dict(m=len(examples) - 1, sample=len(examples), alphas=(1e-10,), batch_size=5, progress=False)
    return RowEncoder.fit(index, adapter, examples, **{**options, **changes})


def test_linear_codes_recover_rows_the_features_determine():
    """Rows that are a linear function of the features, of rank m: the codes of unseen examples give their rows'
    scores for any query."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    y = x[:, :3] @ torch.randn(3, 50, generator=g, dtype=torch.float64) + torch.randn(50, generator=g, dtype=torch.float64)
    t = fit_linear_codes(x[:100], y[:100], m=3, alphas=(1e-10,))
    codes = ((x[100:].float() - t["feature_mean"]) / t["feature_scale"]) @ t["coef"] + t["intercept"]
    q = torch.randn(50, 4, generator=g)
    got = codes @ (t["basis"].T @ q) + t["row_mean"] @ q
    want = y[100:].float() @ q
    assert torch.allclose(got, want, atol=1e-3 * float(want.abs().max()))


def test_principal_directions_are_the_svd_s_from_either_side():
    """Wide (rows of a sample: n < D) and tall inputs: the same top right singular vectors as a full SVD, up to sign;
    beyond the rank, zero columns."""
    g = torch.Generator().manual_seed(1)
    for n, d in ((60, 400), (400, 60)):
        a = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
        want = torch.linalg.svd(a, full_matrices=False).Vh[:10].T
        got = _principal_directions(a, 10)
        assert torch.allclose((got.T @ want).abs(), torch.eye(10, dtype=torch.float64), atol=1e-8)
    low = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 100, generator=g, dtype=torch.float64)
    norms = _principal_directions(low, 6).norm(dim=0)
    assert torch.allclose(norms, torch.tensor([1.0, 1, 1, 0, 0, 0], dtype=torch.float64), atol=1e-10)


def test_interpolating_encoder_gives_the_index_scores(setup):
    """Fitted on every indexed example with no penalty (features outnumber examples: the codes interpolate) and m
    spanning the rows, the encoder's scores are the index's; they serve as a retrieval first stage."""
    adapter, examples, index, estimator = setup
    encoder = _fit(setup)
    codes = encoder.encode(adapter, examples, dtype="float32", progress=False)
    got = encoder.score(estimator, adapter, codes, progress=False)
    want = index.score(estimator, adapter, progress=False)
    assert got.ids == want.ids and got.estimator == "concept_influence[encoder]"
    assert np.abs(got.values - want.values).max() < 1e-3 * np.abs(want.values).max()
    result = certified_retrieval(got, array_scorer(want.column(0)), k=2, budget=6)
    assert set(result.top) == set(np.argsort(-want.column(0))[:2])


def test_save_load_round_trip_is_bit_exact(setup, tmp_path):
    adapter, examples, _, _ = setup
    encoder = _fit(setup, sample=0.75, m=4, alphas=(1.0, 10.0), last_block=0)  # features of block 0: a shorter forward
    # block 0's distinct inputs: W_Q, W_K and W_V read the same tensor with the same basis, so only W_Q's is read
    assert [e["name"] for e in encoder.info["feature_maps"]] == ["blocks.0.attn.W_Q", "blocks.0.attn.W_O",
                                                                "blocks.0.mlp.W_in", "blocks.0.mlp.W_out"]
    loaded = RowEncoder.load(encoder.save(tmp_path / "encoder.safetensors"))
    assert loaded.info == encoder.info
    assert all(torch.equal(loaded.tensors[k], v) for k, v in encoder.tensors.items())
    codes = encoder.encode(adapter, examples, progress=False)
    again = Codes.load(codes.save(tmp_path / "codes.safetensors"))
    assert torch.equal(loaded.encode(adapter, examples, progress=False).values, codes.values)
    assert again.ids == codes.ids and again.encoder == codes.encoder and torch.equal(again.values, codes.values)


def test_storage_per_example_is_m_times_the_dtype(setup):
    adapter, examples, index, _ = setup
    encoder = _fit(setup, m=5)
    for dtype, size in (("float16", 2), ("bfloat16", 2), ("float32", 4)):
        codes = encoder.encode(adapter, examples[:3], dtype=dtype, progress=False)
        assert codes.values.shape == (3, 5) and codes.bytes_per_example == 5 * size
    assert encoder.m == 5 and index.bytes_per_example > 5 * 4


def test_bad_input_is_one_line_naming_the_problem(setup, tokenizer, tmp_path):
    adapter, examples, index, estimator = setup
    other = build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=64, seed=1)
    encoder = _fit(setup, m=3)
    codes = encoder.encode(adapter, examples, progress=False)
    cases = [
        (lambda: RowEncoder.fit(index, other, examples, progress=False), "fingerprint"),
        (lambda: _fit(setup, m=12), "more examples than the code has dimensions"),
        (lambda: _fit(setup, sample=0.1, m=3), "sample=0.1 gives 1 examples"),
        (lambda: RowEncoder.fit(index, adapter, examples[:-1], progress=False), "the index holds 12"),
        (lambda: _fit(setup, checkpoint=1), "checkpoint 1 is not a finished checkpoint"),
        (lambda: _fit(setup, m=3, token_rank=0), "token_rank must be at least 1"),
        (lambda: _fit(setup, m=3, last_block=2), "last_block=2: the index's maps are in blocks 0..1"),
        (lambda: encoder.encode(other, examples, progress=False), "fingerprint"),
        (lambda: encoder.encode(adapter, examples, dtype="int8", progress=False), "dtype 'int8'"),
        (lambda: encoder.score(estimator, adapter, Codes(codes.ids, codes.values, "0" * 16), progress=False),
         "codes made by encoder 0000"),
        (lambda: encoder.score(estimator, adapter, Codes(codes.ids, codes.values[:, :2], encoder.digest),
                               progress=False), "this encoder's codes are [N, 3]"),
        (lambda: RowEncoder.load(codes.save(tmp_path / "codes.safetensors")), "not an encoder file"),
        (lambda: Codes.load(encoder.save(tmp_path / "enc.safetensors")), "not a codes file"),
    ]
    changed = RowEncoder(encoder.tensors, {**encoder.info, "maps": encoder.info["maps"][:-1]})
    cases.append((lambda: changed.encode(adapter, examples, progress=False), "the index changed since the encoder"))
    for call, phrase in cases:
        with pytest.raises(EncoderError) as err:
            call()
        message = str(err.value)
        assert phrase in message and "\n" not in message, message
