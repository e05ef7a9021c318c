"""The causal check of a concept on a toy model whose answer is known by construction.

A one-block TransformerLens model without normalisation has logits linear in the last residual stream, so adding
``s·v̂`` at ``blocks.0.hook_resid_post`` changes logit(A) − logit(B) by exactly ``s·⟨W_U[:,A] − W_U[:,B], v̂⟩`` at
every position. With single-token answers A (positive) and B (negative) to the same prompts, the behaviour
log p(A) − log p(B) then moves by exactly that (the log-partition cancels): the first-order effect is known.
"""

import numpy as np
import pytest
import torch

from concept_influence.concept_check import ConceptCheckError, check_concept
from concept_influence.data import TokenizedExample
from concept_influence.models import HookedTransformerAdapter
from probes import ConceptDirection

A, B = 5, 9


@pytest.fixture(scope="module")
def toy():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=24, n_heads=2, d_head=12, d_mlp=48, n_ctx=16, d_vocab=12,
                                  act_fn="relu", normalization_type=None, seed=0, device="cpu")
    adapter = HookedTransformerAdapter(HookedTransformer(cfg), tokenizer=type("Tok", (), {"pad_token_id": 0})())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 12, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (10,), generator=g)]
    positive = [TokenizedExample(f"p{i}", (*p, A), len(p)) for i, p in enumerate(prompts)]
    negative = [TokenizedExample(f"n{i}", (*p, B), len(p)) for i, p in enumerate(prompts)]
    return adapter, positive, negative


def _direction(vector, hook="blocks.0.hook_resid_post"):
    return ConceptDirection(vector, hook, int(hook.split(".")[1]), "custom")


def test_first_order_effect_is_exact_and_the_verdicts_follow_it(toy):
    adapter, positive, negative = toy
    w_u = adapter.model.W_U.detach()
    u = w_u[:, A] - w_u[:, B]
    check = check_concept(adapter, _direction(u), positive, negative, alphas=(-2, -0.5, 0.5, 2))
    expected = check.projection_sd * float(u.norm())  # ⟨u, û⟩ = ‖u‖
    for where in ("all", "prompt"):  # the answer is predicted at the last prompt position: both steerings reach it
        assert check.first_order[where] == pytest.approx(expected, rel=1e-4)
        assert check.verdicts[where] == "causal"
        # linear in α: the behaviour at ±2 sd is twice the first-order step
        assert check.behaviour[where][-1] - check.baseline == pytest.approx(2 * expected, rel=1e-4)
    assert check.verdict == "causal" and "causal" in check.explanation()

    reversed_check = check_concept(adapter, _direction(-u), positive, negative)
    assert reversed_check.verdict == "reversed"
    assert reversed_check.first_order["all"] == pytest.approx(-reversed_check.projection_sd * float(u.norm()), rel=1e-4)


def test_a_direction_the_unembedding_cannot_see_is_weak(toy):
    adapter, positive, negative = toy
    w_u = adapter.model.W_U.detach()
    # a vector orthogonal to every unembedding column changes no logit at all
    q, _ = torch.linalg.qr(w_u, mode="complete")
    null = q[:, -1]
    assert float((w_u.T @ null).abs().max()) < 1e-5
    check = check_concept(adapter, _direction(null), positive, negative, positions=("all",))
    assert abs(check.first_order["all"]) < 1e-4
    assert check.verdict == "weak" and "does not drive the behaviour" in check.explanation()
    assert list(check.behaviour) == ["all"]


def test_report_and_plot(toy, tmp_path):
    adapter, positive, negative = toy
    w_u = adapter.model.W_U.detach()
    check = check_concept(adapter, _direction(w_u[:, A] - w_u[:, B]), positive, negative)
    text = check.format()
    assert "first-order effect (all positions)" in text and "first-order effect (prompt positions)" in text
    path = check.plot(tmp_path / "check.png")
    assert path.stat().st_size > 1000
    d = check.to_dict()
    assert d["verdict"] == "causal" and np.isfinite(d["separation_auroc"])


@pytest.mark.parametrize("change, message", [
    (dict(positive=[]), "needs positive and negative examples, got 0 positive"),
    (dict(direction=_direction(torch.ones(7))), "has 7 dimensions, but blocks.0.hook_resid_post has width 24"),
    (dict(direction=_direction(torch.ones(24), "blocks.3.hook_resid_post")), "out of range"),
    (dict(alphas=(0.5, 1.0)), "at least one positive and one negative step"),
    (dict(positions=("response",)), "unknown steering positions 'response'"),
])
def test_bad_input_gets_one_clear_error(toy, change, message):
    adapter, positive, negative = toy
    args = dict(direction=_direction(torch.ones(24)), positive=positive, negative=negative)
    args.update(change)
    with pytest.raises((ConceptCheckError, KeyError), match=message):
        check_concept(adapter, args.pop("direction"), args.pop("positive"), args.pop("negative"), **args)


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
def test_edit_activation_is_seen_downstream_in_every_adapter(any_adapter, tokenized, hook):
    from concept_influence.data import collate

    batch = collate(tokenized[:3], any_adapter.pad_token_id)
    shift = torch.randn(any_adapter.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = any_adapter.activations(batch, "blocks.1.hook_resid_pre")
        logits = any_adapter.logits(batch)
        with any_adapter.edit_activation(hook, lambda act: act + shift):
            edited = any_adapter.activations(batch, "blocks.1.hook_resid_pre")
            steered_logits = any_adapter.logits(batch)
        after = any_adapter.logits(batch)  # the edit is removed on exit
    torch.testing.assert_close(edited, plain + shift)
    assert not torch.allclose(steered_logits, logits)
    torch.testing.assert_close(after, logits)
    with pytest.raises(KeyError, match="unknown hook name"):
        with any_adapter.edit_activation("blocks.0.hook_nope", lambda act: act):
            pass


@pytest.mark.parametrize("auroc, verdict, says", [
    (0.50, "weak", "the direction does not separate the texts (AUROC 0.50, chance is 0.5"),
    (0.57, "causal", "; but the direction does not separate the texts (AUROC 0.57"),
    (0.80, "weak", "the direction separates the texts (AUROC 0.80) but it does not drive the behaviour"),
    (0.20, "reversed", "the direction separates the texts the other way round (AUROC 0.20)"),
])
def test_the_explanation_of_the_separation_follows_its_auroc(auroc, verdict, says):
    """Within 0.1 of chance the explanation says the direction does not separate the texts, whatever the verdict."""
    from concept_influence.concept_check import SEPARATION_MARGIN, ConceptCheck

    effect = {"causal": 0.05, "weak": 0.0, "reversed": -0.05}[verdict]
    check = ConceptCheck("blocks.0.hook_resid_post", 10, 10, auroc, 1.0, [-1.0, 1.0], 0.0, {"all": [-effect, effect]},
                         {"all": effect}, {"all": 0.001}, {"all": verdict}, 0.01)
    assert check.separates == (abs(auroc - 0.5) >= SEPARATION_MARGIN)
    assert check.explanation().startswith(verdict) and says in check.explanation()
