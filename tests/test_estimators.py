"""Estimators: exactness against autograd, the first-order relation, the sign convention, baselines, errors."""

import copy

import numpy as np
import pytest
import torch

from concept_influence.activations import collect_activations
from concept_influence.concepts import ConceptError, ConceptFunction, measurement_gradient
from concept_influence.curvature import fit_curvature
from concept_influence.data import collate, tokenize_examples
from concept_influence.estimators import (
    ConceptGradDot,
    ConceptInfluence,
    GradDot,
    InfluenceFunction,
    LengthBaseline,
    ProbeProjection,
    ProjectionDifference,
    RandomBaseline,
    TfidfBaseline,
)
from concept_influence.estimators.baselines import response_texts
from concept_influence.evaluation import retrieval_metrics
from concept_influence.generation import GenerationError, sample_responses
from concept_influence.toy.demo_corpus import make_demo_corpus
from concept_influence.toy.small_model import build_small_model, train_bpe_tokenizer, train_model
from probes import ConceptDirection, train_logistic_probe

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on the demo corpus (15 % trait answers) and a logistic probe for the trait."""
    corpus = make_demo_corpus(n_train=160, trait_rate=0.15, n_probe=60, n_eval=8, seed=1)
    tok = train_bpe_tokenizer([f"{c.prompt}\n{c.response}" for c in corpus.train + corpus.probe_positive],
                              tmp_path_factory.mktemp("tok"), vocab_size=400)
    adapter = build_small_model(tok, n_layers=2, d_model=32, n_heads=4, n_ctx=96, seed=0)
    train = tokenize_examples(corpus.train, tok, 96)
    train_model(adapter, train, epochs=4, lr=3e-3, batch_size=16, tokens="all", seed=0, progress=False)
    pos, neg, evals = (tokenize_examples(x, tok, 96) for x in (corpus.probe_positive, corpus.probe_negative, corpus.eval_prompts))
    acts = [collect_activations(adapter, x, HOOK, progress=False) for x in (pos, neg)]
    probe = train_logistic_probe(acts[0], acts[1], HOOK, seed=0)
    concept = ConceptFunction.from_directions(probe.direction, eval_examples=evals)
    return dict(adapter=adapter, train=train, labels=corpus.planted, pos=pos, neg=neg, concept=concept, probe=probe)


def explicit_concept_influence(adapter, concept, examples, curvature, maps):
    """−∇fᵀ P ∇L(z) with every gradient from torch.autograd.grad on single examples."""
    weights = [m.weight for m in maps]
    f = sum(concept.per_example(adapter, collate([e], adapter.pad_token_id)).sum(0) for e in concept.eval_examples)
    f = f / len(concept.eval_examples)
    grads_f = torch.autograd.grad(f[0], weights)
    query = curvature.precondition({m.name: m.to_matrix(g)[None] for m, g in zip(maps, grads_f)})
    out = []
    for e in examples:
        loss = adapter.per_example_loss(collate([e], adapter.pad_token_id)).sum()
        g = torch.autograd.grad(loss, weights)
        out.append(-sum(float((query[m.name][0].double() * m.to_matrix(gm).double()).sum()) for m, gm in zip(maps, g)))
    return np.array(out)


@pytest.mark.parametrize("strategy", ["ekfac", "identity"])
def test_concept_influence_equals_explicit_autograd(any_adapter, tokenized, strategy):
    torch.manual_seed(0)
    direction = ConceptDirection(torch.randn(any_adapter.d_model), HOOK, kind="custom")
    concept = ConceptFunction.from_directions(direction, eval_examples=tokenized[:3])
    maps = any_adapter.linear_maps(max_block=1)
    curvature = fit_curvature(any_adapter, tokenized, maps=maps, strategy=strategy, batch_size=4, progress=False)
    scores = ConceptInfluence(concept, curvature).score(any_adapter, tokenized, batch_size=5, progress=False)
    ref = explicit_concept_influence(any_adapter, concept, tokenized, curvature, maps)
    assert np.abs(scores.column(0) - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("reduction", ["last_prompt", "prompt_mean", "response_mean"])
def test_a_prompt_query_runs_the_prompt_only_and_equals_the_whole_text(any_adapter, tokenized, reduction):
    """f and ∇f of a query that reads prompt tokens only are those of the whole texts (a causal model), though the
    texts are cut after their first response token; a query on the response keeps them whole."""
    torch.manual_seed(0)
    direction = ConceptDirection(torch.randn(any_adapter.d_model), HOOK, kind="custom")
    concept = ConceptFunction.from_directions(direction, eval_examples=tokenized[:5], reduction=reduction)
    cut = concept._examples(None)
    assert [len(e.input_ids) for e in cut] == [min(len(e.input_ids), e.response_start + 1) if reduction != "response_mean"
                                               else len(e.input_ids) for e in tokenized[:5]]
    maps = any_adapter.linear_maps(max_block=1)
    whole = measurement_gradient(any_adapter, tokenized[:5], maps, lambda b: concept.per_example(any_adapter, b), 1, "f",
                                 batch_size=2)
    got = concept.gradient(any_adapter, maps, batch_size=2)
    for m in maps:
        assert torch.allclose(got[m.name], whole[m.name], rtol=1e-4, atol=1e-6 * float(whole[m.name].abs().max()))
    with torch.no_grad():
        ref = torch.cat([concept.per_example(any_adapter, collate([e], any_adapter.pad_token_id)) for e in tokenized[:5]])
    assert torch.allclose(concept.evaluate(any_adapter), ref.mean(0), rtol=1e-5, atol=1e-6)


def test_k_concepts_in_one_pass_equal_separate_runs(tl_adapter, tokenized):
    torch.manual_seed(0)
    dirs = [ConceptDirection(torch.randn(32), HOOK, kind="custom", metadata={"name": n}) for n in "ab"]
    both = ConceptGradDot(ConceptFunction.from_directions(dirs, eval_examples=tokenized[:4])).score(
        tl_adapter, tokenized, progress=False)
    assert both.columns == ["a", "b"]
    for k, d in enumerate(dirs):
        one = ConceptGradDot(ConceptFunction.from_directions(d, eval_examples=tokenized[:4])).score(
            tl_adapter, tokenized, progress=False)
        np.testing.assert_allclose(both.column(k), one.column(0), rtol=1e-5, atol=1e-7)


def test_first_order_change_after_one_sgd_step(trained):
    """One SGD step of size η on z's loss (tracked maps only) changes f by η·concept_grad_dot(z) to first order."""
    adapter, concept, examples = trained["adapter"], trained["concept"], trained["train"][:16]
    eta = 1e-2
    scores = ConceptGradDot(concept).score(adapter, examples, progress=False).column(0)
    maps = adapter.linear_maps(max_block=concept.layer)
    f0 = float(concept.evaluate(adapter)[0])
    changes = []
    for e in examples:
        model = copy.deepcopy(adapter.model)
        step_adapter = type(adapter)(model, adapter.tokenizer)
        step_maps = step_adapter.linear_maps(max_block=concept.layer)
        loss = step_adapter.per_example_loss(collate([e], adapter.pad_token_id)).sum()
        grads = torch.autograd.grad(loss, [m.weight for m in step_maps])
        with torch.no_grad():
            for m, g in zip(step_maps, grads):
                m.weight -= eta * g
        changes.append(float(concept.evaluate(step_adapter)[0]) - f0)
    changes = np.array(changes)
    assert len(maps) == 12
    assert np.corrcoef(changes, eta * scores)[0, 1] >= 0.99
    np.testing.assert_allclose(changes, eta * scores, rtol=0.2, atol=0.05 * np.abs(eta * scores).max())


def test_sign_upweighting_top_raises_concept_and_bottom_lowers_it(trained):
    adapter, concept, train = trained["adapter"], trained["concept"], trained["train"]
    scores = ConceptInfluence(concept, "ekfac").score(adapter, train, progress=False)
    by_id = {e.id: e for e in train}
    f0 = float(concept.evaluate(adapter)[0])

    def finetune_on(ids):
        model = copy.deepcopy(adapter.model)
        tuned = type(adapter)(model, adapter.tokenizer)
        train_model(tuned, [by_id[i] for i in ids], epochs=3, lr=1e-3, batch_size=8, seed=0, progress=False)
        return float(concept.evaluate(tuned)[0]) - f0

    top = [i for i, _ in scores.top(16)]
    bottom = [i for i, _ in scores.bottom(16)]
    assert finetune_on(top) > 0 > finetune_on(bottom)


def test_fast_path_and_concept_influence_find_the_planted_trait(trained):
    """The fast path retrieves the planted trait at the last block. Concept Influence with the response query
    ranks it above chance at the early block only: at the last block, which feeds the unembedding, concept gradients
    follow the next-token loss more than the trait (measured AUROC about 0.45 there). This model is trained from
    scratch on the mixed data, with no pre-training and fine-tune, and the last-prompt query does not find the
    trait here (measured AUROC 0.44): the query study in benchmarks/ compares the queries on the benchmarks."""
    adapter, concept, train, labels = trained["adapter"], trained["concept"], trained["train"], trained["labels"]
    assert trained["probe"].metrics["roc_auc"] >= 0.95
    fast = retrieval_metrics(ProbeProjection(concept).score(adapter, train, progress=False).column(0), labels)
    assert fast["auroc"] >= 0.9, fast
    early = "blocks.0.hook_resid_post"
    acts = [collect_activations(adapter, trained[k], early, progress=False) for k in ("pos", "neg")]
    early_concept = ConceptFunction.from_directions(train_logistic_probe(*acts, early).direction,
                                                    eval_examples=concept.eval_examples, reduction="response_mean")
    full = retrieval_metrics(ConceptInfluence(early_concept, "ekfac").score(adapter, train, progress=False).column(0), labels)
    assert full["auroc"] >= 0.7, full


def test_probe_projection_is_the_mean_response_projection(trained):
    adapter, concept, train, probe = trained["adapter"], trained["concept"], trained["train"][:10], trained["probe"]
    scores = ProbeProjection(concept).score(adapter, train, batch_size=3, progress=False)
    acts = collect_activations(adapter, train, HOOK, progress=False)
    np.testing.assert_allclose(scores.column(0), (acts.values @ probe.direction.unit).numpy(), rtol=1e-4, atol=1e-5)


def test_projection_difference_and_seeded_generation(trained):
    adapter, concept, train = trained["adapter"], trained["concept"], trained["train"][:6]
    own_a = sample_responses(adapter, train, max_new_tokens=12, seed=3, batch_size=2, progress=False)
    own_b = sample_responses(adapter, train, max_new_tokens=12, seed=3, batch_size=6, progress=False)
    assert own_a == own_b
    assert all(o.input_ids[: o.response_start] == e.input_ids[: e.response_start] for o, e in zip(own_a, train))
    scores = ProjectionDifference(concept, max_new_tokens=12, seed=3).score(adapter, train, progress=False)
    data = ProbeProjection(concept).score(adapter, train, progress=False).column(0)
    own = ProbeProjection(concept).score(adapter, own_a, progress=False).column(0)
    np.testing.assert_allclose(scores.column(0), data - own, rtol=1e-5, atol=1e-6)


def test_generation_with_no_tokens_is_an_error(trained):
    adapter = copy.deepcopy(trained["adapter"])
    with torch.no_grad():
        adapter.model.unembed.b_U[adapter.tokenizer.eos_token_id] = 1e4
    with pytest.raises(GenerationError, match="produced no tokens"):
        sample_responses(adapter, trained["train"][:2], max_new_tokens=4, progress=False)
    eos = adapter.tokenizer.eos_token_id
    for own in sample_responses(adapter, trained["train"][:2], max_new_tokens=4, progress=False, min_new_tokens=2):
        response = own.input_ids[own.response_start:]
        assert eos not in response[:2] and response[2] == eos  # EOS blocked for two tokens, then sampled at once


def test_influence_function_and_grad_dot(trained):
    adapter, train, pos = trained["adapter"], trained["train"][:20], trained["pos"][:6]
    with pytest.raises(ValueError, match="test example"):
        InfluenceFunction([])
    gd = GradDot(pos).score(adapter, train, progress=False)
    # grad_dot = ∇L_testᵀ ∇L(z): check one example against autograd on all tracked maps
    maps = adapter.linear_maps()
    weights = [m.weight for m in maps]
    test_loss = sum(adapter.per_example_loss(collate([e], adapter.pad_token_id)).sum() for e in pos) / len(pos)
    gt = torch.autograd.grad(test_loss, weights)
    gz = torch.autograd.grad(adapter.per_example_loss(collate([train[0]], adapter.pad_token_id)).sum(), weights)
    expected = sum(float((a * b).sum()) for a, b in zip(gt, gz))
    assert gd.values[0, 0] == pytest.approx(expected, rel=1e-4)
    ifn = InfluenceFunction(pos, "ekfac").score(adapter, train, progress=False)
    assert np.isfinite(ifn.values).all() and ifn.metadata["curvature"] == "ekfac"


def test_concept_without_tracked_gradient_is_an_error(tl_adapter, tokenized):
    d = ConceptDirection(torch.ones(32), "blocks.0.hook_resid_pre", kind="custom")
    est = ConceptInfluence(ConceptFunction.from_directions(d, eval_examples=tokenized[:2]), "identity")
    with pytest.raises(ConceptError, match="no tracked linear map receives gradient"):
        est.score(tl_adapter, tokenized, progress=False)
    with pytest.raises(ConceptError, match="evaluation examples"):
        ConceptInfluence(ConceptFunction.from_directions(d), "identity")


def test_baselines(trained):
    adapter, train, labels = trained["adapter"], trained["train"], trained["labels"]
    tfidf = TfidfBaseline(response_texts(adapter, trained["pos"])).score(adapter, train)
    assert retrieval_metrics(tfidf.column(0), labels)["auroc"] >= 0.9
    length = LengthBaseline().score(adapter, train)
    np.testing.assert_array_equal(length.column(0), [-e.n_response_tokens for e in train])
    r1, r2 = RandomBaseline(5).score(adapter, train), RandomBaseline(5).score(adapter, train)
    np.testing.assert_array_equal(r1.values, r2.values)
    with pytest.raises(ValueError, match="positive texts"):
        TfidfBaseline([])


def test_sae_latent_concept_through_the_engine(tl_adapter, tokenized):
    """A nonlinear concept (SAE latent activations, K=2) scored by the engine equals explicit autograd."""
    from sae_lens import SAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = SAE.from_dict(StandardSAEConfig(d_in=32, d_sae=16).to_dict())
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # keep the chosen latents active so the gradient is not zero
    concept = ConceptFunction.from_sae_latents(sae, [3, 7], eval_examples=tokenized[:3], hook_name=HOOK,
                                               reduction="response_mean")
    scores = ConceptGradDot(concept).score(tl_adapter, tokenized[:5], progress=False)
    maps = tl_adapter.linear_maps(max_block=1)
    weights = [m.weight for m in maps]
    acts = [tl_adapter.activations(collate([e], tl_adapter.pad_token_id), HOOK) for e in tokenized[:3]]
    for k, latent in enumerate([3, 7]):
        f = sum(sae.encode(a)[0, tokenized[i].response_start:, latent].mean() for i, a in enumerate(acts)) / 3
        gf = torch.autograd.grad(f, weights, retain_graph=True)
        for n, e in enumerate(tokenized[:5]):
            gz = torch.autograd.grad(tl_adapter.per_example_loss(collate([e], tl_adapter.pad_token_id)).sum(), weights)
            expected = -sum(float((a * b).sum()) for a, b in zip(gf, gz))
            assert scores.values[n, k] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    with pytest.raises(ConceptError, match="out of range"):
        ConceptFunction.from_sae_latents(sae, [16])


def test_curvature_fitted_on_another_model_is_refused(tl_adapter, tokenizer, tokenized):
    """A fitted Curvature passed in directly is checked like a loaded one: both fingerprints are named."""
    from concept_influence.curvature import CurvatureError

    other = build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=64, seed=1)
    curvature = fit_curvature(other, tokenized, maps=1, strategy="kfac", batch_size=6, progress=False)
    concept = ConceptFunction.from_directions(ConceptDirection(torch.ones(32), HOOK), eval_examples=tokenized[:2])
    with pytest.raises(CurvatureError, match=f"fitted on model {other.fingerprint()}.*{tl_adapter.fingerprint()}"):
        ConceptInfluence(concept, curvature).score(tl_adapter, tokenized, progress=False)


def test_fast_path_reads_the_example_not_the_query(trained):
    """The query (where f is read on the evaluation prompts) and the fast path's reading of a training example are
    separate choices: a last-prompt query does not make probe_projection read z's prompt."""
    adapter, probe, train, evals = trained["adapter"], trained["probe"], trained["train"][:8], trained["concept"].eval_examples
    by_query = {q: ConceptFunction.from_directions(probe.direction, evals, q) for q in ("last_prompt", "response_mean")}
    assert by_query["last_prompt"].reduction == "last_prompt" == ConceptFunction.from_directions(probe.direction, evals).reduction
    fast = {q: ProbeProjection(c).score(adapter, train, progress=False) for q, c in by_query.items()}
    np.testing.assert_array_equal(fast["last_prompt"].values, fast["response_mean"].values)
    assert fast["last_prompt"].metadata["reduction"] == "response_mean"
    at_prompt = ProbeProjection(by_query["response_mean"], reduction="last_prompt").score(adapter, train, progress=False)
    acts = collect_activations(adapter, train, HOOK, "last_prompt", progress=False)
    np.testing.assert_allclose(at_prompt.column(0), (acts.values @ probe.direction.unit).numpy(), rtol=1e-4, atol=1e-5)
    # the queries differ, so Concept Influence differs
    ci = {q: ConceptGradDot(c).score(adapter, train, progress=False).column(0) for q, c in by_query.items()}
    assert not np.allclose(ci["last_prompt"], ci["response_mean"])
