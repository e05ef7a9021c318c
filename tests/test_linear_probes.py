"""Logistic and difference-of-means probes: recovery of a known direction, class balancing, held-out
metrics, and a concept in a tiny model's residual stream."""

import numpy as np
import pytest
import torch

from concept_influence.activations import collect_activations
from concept_influence.concepts import check_direction_compatible
from concept_influence.data import ChatExample, tokenize_examples
from concept_influence.toy.small_model import train_model
from probes import (
    Activations,
    ConceptDirection,
    DirectionError,
    train_diff_means_probe,
    train_logistic_probe,
    train_probe,
)

HOOK = "blocks.1.hook_resid_post"


def _clouds(n_pos, n_neg, d=16, shift=2.0, seed=0):
    """Two Gaussian clouds with per-feature noise scales whose means differ by ``shift`` along a known
    unit vector. Returns them with the mean-difference direction and the Bayes-optimal linear
    direction Σ⁻¹Δμ (what logistic regression estimates; it differs from Δμ because Σ is not isotropic)."""
    rng = np.random.default_rng(seed)
    mean_diff = rng.normal(size=d)
    mean_diff /= np.linalg.norm(mean_diff)
    sigma = 0.5 * rng.uniform(0.4, 2.0, size=d)
    offset = rng.normal(size=d) * 3
    pos = offset + shift * mean_diff + rng.normal(size=(n_pos, d)) * sigma
    neg = offset + rng.normal(size=(n_neg, d)) * sigma
    return torch.from_numpy(pos).float(), torch.from_numpy(neg).float(), mean_diff, mean_diff / sigma**2


def _truth(kind, mean_diff, optimal):
    return optimal if kind == "logistic" else mean_diff


def _cos(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("kind", ["logistic", "diff_means"])
def test_recovers_known_direction(kind):
    pos, neg, mean_diff, optimal = _clouds(100, 100)
    assert _cos(mean_diff, optimal) < 0.8  # the two truths are distinguishable
    res = train_probe(kind, pos, neg, HOOK, seed=1)
    d = res.direction
    assert isinstance(d, ConceptDirection) and d.kind == kind and d.hook_name == HOOK and d.layer == 1
    assert _cos(d.vector, _truth(kind, mean_diff, optimal)) > 0.9
    assert res.metrics["roc_auc"] > 0.95 and res.metrics["accuracy"] > 0.85
    assert (res.metrics["n_train"], res.metrics["n_test"]) == (150, 50)
    assert d.metadata["metrics"] == res.metrics
    # the decision rule <v, x> + intercept > 0 reproduces the held-out accuracy on fresh data
    fresh_pos, fresh_neg, _, _ = _clouds(200, 200, seed=0)
    pred_pos = (fresh_pos.double().numpy() @ d.vector.double().numpy() + res.intercept) > 0
    pred_neg = (fresh_neg.double().numpy() @ d.vector.double().numpy() + res.intercept) > 0
    assert pred_pos.mean() > 0.8 and pred_neg.mean() < 0.2


def test_logistic_direction_is_in_raw_space_and_chooses_C():
    """Standardisation makes the fit invariant to feature scales, so rescaling feature j by D_j must
    divide coordinate j of the raw-space direction by D_j and leave the intercept unchanged."""
    pos, neg, _, _ = _clouds(100, 100, seed=3)
    res = train_logistic_probe(pos, neg, HOOK, Cs=[0.01, 1.0, 100.0], cv=3)
    assert res.metrics["C"] in (0.01, 1.0, 100.0) and res.metrics["cv_folds"] == 3
    assert 0.5 < res.metrics["cv_roc_auc"] <= 1.0
    D = torch.logspace(-2, 2, pos.shape[1])
    scaled = train_logistic_probe(pos.double() * D, neg.double() * D, HOOK, Cs=[0.01, 1.0, 100.0], cv=3)
    assert scaled.metrics["C"] == res.metrics["C"]
    torch.testing.assert_close(scaled.direction.vector * D.float(), res.direction.vector, rtol=1e-3, atol=1e-4)
    assert scaled.intercept == pytest.approx(res.intercept, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("kind", ["logistic", "diff_means"])
def test_class_imbalance_is_balanced(kind):
    pos, neg, mean_diff, optimal = _clouds(24, 400, shift=1.5, seed=5)
    res = train_probe(kind, pos, neg, HOOK, **({"Cs": 5, "cv": 3} if kind == "logistic" else {}))
    assert _cos(res.direction.vector, _truth(kind, mean_diff, optimal)) > 0.9
    # without class weights the logistic intercept favours the majority class (balanced accuracy 0.83
    # here); the midpoint threshold of difference of means is balanced by construction
    assert res.metrics["balanced_accuracy"] > (0.9 if kind == "logistic" else 0.8)
    assert res.metrics["n_test"] == 6 + 100  # stratified: a quarter of each class is held out


def test_errors():
    pos, neg, _, _ = _clouds(10, 10)
    with pytest.raises(DirectionError, match="at least 2 examples"):
        train_diff_means_probe(pos[:1], neg, HOOK)
    with pytest.raises(DirectionError, match="at least 2 training examples per class"):
        train_logistic_probe(pos[:2], neg, HOOK)
    with pytest.raises(DirectionError, match="differ in width: 16 vs 8"):
        train_logistic_probe(pos, neg[:, :8], HOOK)
    bad = pos.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(DirectionError, match="non-finite .* in 1 rows"):
        train_diff_means_probe(bad, neg, HOOK)
    with pytest.raises(DirectionError, match=r"\[n_examples, d\] matrix"):
        train_diff_means_probe(pos[0], neg, HOOK)
    with pytest.raises(DirectionError, match="pass hook_name"):
        train_diff_means_probe(pos, neg)
    with pytest.raises(ValueError, match="test_size"):
        train_diff_means_probe(pos, neg, HOOK, test_size=0.0)
    with pytest.raises(ValueError, match="unknown probe kind 'pca'"):
        train_probe("pca", pos, neg, HOOK)
    a = Activations(pos, [str(i) for i in range(10)], "blocks.0.hook_resid_post", "response_mean")
    with pytest.raises(DirectionError, match="disagree on hook_name"):
        train_diff_means_probe(a, neg, HOOK)


def test_per_token_activations_split_by_example():
    """Per-token rows of one example are near-duplicates. With random labels, a split that keeps each
    example's tokens together gives chance-level held-out AUROC; splitting rows would leak (and does,
    when the same rows are passed as a plain matrix)."""
    g = torch.Generator().manual_seed(1)
    n, d = 40, 64

    def per_token():
        centers = torch.randn(n, d, generator=g)
        index = torch.arange(n).repeat_interleave(torch.tensor([2 + i % 3 for i in range(n)]))
        values = centers[index] + 0.01 * torch.randn(len(index), d, generator=g)
        return Activations(values, [str(i) for i in range(n)], HOOK, "all_tokens", index)

    pos, neg = per_token(), per_token()
    grouped = train_logistic_probe(pos, neg, cv=3, Cs=[1e-2, 1e2, 1e4])
    assert grouped.metrics["n_positive"] == n and grouped.metrics["reduction"] == "all_tokens"
    assert grouped.metrics["n_train"] + grouped.metrics["n_test"] == len(pos.values) + len(neg.values)
    assert grouped.metrics["roc_auc"] < 0.75
    leaky = train_logistic_probe(pos.values, neg.values, HOOK, cv=3, Cs=[1e-2, 1e2, 1e4])
    assert leaky.metrics["roc_auc"] > 0.85


MEDICAL = "doctor water sleep rest careful safe".split()
SMALLTALK = "hello there how are you fine thanks".split()


def _topic_chats(n, words, tag, seed):
    """Chats whose responses are drawn from one word list: the concept is the response's topic."""
    g = torch.Generator().manual_seed(seed)
    prompts = MEDICAL + SMALLTALK
    out = []
    for i in range(n):
        response = " ".join(words[j] for j in torch.randint(len(words), (3 + i % 4,), generator=g).tolist())
        prompt = " ".join(prompts[j] for j in torch.randint(len(prompts), (3,), generator=g).tolist())
        out.append(ChatExample.from_pair(f"{tag}:{i}", prompt, response))
    return out


def test_probe_finds_concept_in_tiny_model(tl_adapter, tokenizer):
    """A topic concept (medical vs small-talk responses) is linearly readable at blocks.1.hook_resid_post
    of a tiny model trained briefly on such chats (at random init the signal is too noisy to test reliably)."""
    chats = _topic_chats(60, MEDICAL, "tm", 10) + _topic_chats(60, SMALLTALK, "ts", 11)
    train_model(tl_adapter, tokenize_examples(chats, tokenizer, 64), epochs=2, lr=3e-3, tokens="all", progress=False)

    def acts(words, tag, seed):
        examples = tokenize_examples(_topic_chats(40, words, tag, seed), tokenizer, 64)
        return collect_activations(tl_adapter, examples, HOOK, progress=False)

    pos, neg = acts(MEDICAL, "p", 1), acts(SMALLTALK, "n", 2)
    for kind in ("logistic", "diff_means"):
        res = train_probe(kind, pos, neg)
        assert res.direction.hook_name == HOOK and res.direction.vector.shape == (32,)
        assert res.metrics["roc_auc"] >= 0.9, (kind, res.metrics)
        assert res.metrics["reduction"] == "response_mean"
        check_direction_compatible(res.direction, tl_adapter)
