"""TrackStar's optimizer-state correction (AdamStateCurvature): built from a Trainer checkpoint's optimizer.pt (read with
weights_only=True), its scores are the explicit ones, <D²∘q, ∇L(z)> with D = 1/(sqrt(v̂)+ε) read from the optimizer,
it saves and loads, the uncompressed index takes it and the projected ones refuse it, and bad files are one-line
errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from concept_influence.concepts import ConceptFunction
from concept_influence.curvature import AdamStateCurvature, Curvature, CurvatureError
from concept_influence.data import collate
from concept_influence.estimators import ConceptInfluence, InfluenceFunction
from concept_influence.models import HFCausalLMAdapter
from conftest import _hf_model
from probes import ConceptDirection

HOOK = "blocks.1.hook_resid_post"


class Evil:
    """A custom class: a pickle holding one must not be loaded."""


def _train(adapter, examples, optimizer, steps=3):
    """A few Adam steps on mini-batches of ``examples``, as a fine-tune would make them."""
    for i in range(steps):
        optimizer.zero_grad()
        batch = examples[4 * i:4 * (i + 1)]
        adapter.per_example_loss(collate(batch, adapter.pad_token_id)).mean().backward()
        optimizer.step()
    optimizer.zero_grad()


def _checkpoint(tmp_path, optimizer):
    """A Trainer-like checkpoint folder: optimizer.pt saved as the Trainer saves it."""
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    return folder


@pytest.fixture
def gpt2(tokenizer, tokenized, tmp_path):
    """A tiny GPT-2 fine-tuned 3 steps by AdamW in the Trainer's two groups (transformers' own decay rule)."""
    from transformers import Trainer

    model = _hf_model("gpt2", len(tokenizer))
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.1},
              {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
    assert groups[0]["params"] and groups[1]["params"]
    adapter = HFCausalLMAdapter(model, tokenizer)
    optimizer = torch.optim.AdamW(groups, lr=1e-2, eps=1e-6)
    _train(adapter, tokenized, optimizer)
    return adapter, optimizer, _checkpoint(tmp_path, optimizer)


def _concept(adapter, tokenized):
    torch.manual_seed(0)
    return ConceptFunction.from_directions(ConceptDirection(torch.randn(adapter.d_model), HOOK, kind="custom"),
                                           eval_examples=tokenized[:3])


def _explicit(adapter, optimizer, measure, examples, maps, power=2):
    """−<D^power ∘ ∇f, ∇L(z)> in the parameters' own shape, D from the live optimizer's state, every gradient from
    torch.autograd.grad on single examples."""
    weights = [m.weight for m in maps]
    d = []
    for w in weights:
        state, group = optimizer.state[w], next(g for g in optimizer.param_groups if any(p is w for p in g["params"]))
        v_hat = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** float(state["step"]))
        d.append(1 / (v_hat.sqrt() + group["eps"]))
    query = [dw ** power * g.double() for dw, g in zip(d, torch.autograd.grad(measure(), weights))]
    out = []
    for e in examples:
        loss = adapter.per_example_loss(collate([e], adapter.pad_token_id)).sum()
        out.append(-sum(float((q * g.double()).sum()) for q, g in zip(query, torch.autograd.grad(loss, weights))))
    return np.array(out)


def _mean_f(adapter, concept):
    f = sum(concept.per_example(adapter, collate([e], adapter.pad_token_id)).sum(0) for e in concept.eval_examples)
    return f[0] / len(concept.eval_examples)


def _minus_mean_loss(adapter, test):
    return lambda: -sum(adapter.per_example_loss(collate([e], adapter.pad_token_id)).sum() for e in test) / len(test)


def test_scores_equal_the_explicit_trackstar_correction(gpt2, tokenized):
    adapter, optimizer, folder = gpt2
    curvature = AdamStateCurvature.from_checkpoint(adapter, folder)
    assert curvature.strategy == "adam_state" and curvature.power == 2 and curvature.source.endswith("optimizer.pt")
    train = tokenized[:6]
    concept = _concept(adapter, tokenized)
    maps = adapter.linear_maps(max_block=1)
    got = ConceptInfluence(concept, curvature).score(adapter, train, batch_size=3, progress=False).column(0)
    ref = _explicit(adapter, optimizer, lambda: _mean_f(adapter, concept), train, maps)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # classic influence: ∇L_testᵀ D² ∇L(z) (its measurement is minus the mean test loss)
    test = tokenized[8:10]
    got = InfluenceFunction(test, curvature).score(adapter, train, batch_size=3, progress=False).column(0)
    ref = _explicit(adapter, optimizer, _minus_mean_loss(adapter, test), train, adapter.linear_maps())
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_one_optimizer_group_power_one_save_load_and_the_index(tl_adapter, tokenized, tmp_path):
    """A plain AdamW(model.parameters()) on a TransformerLens model (head-shaped weights); power 1 multiplies by D once;
    the curvature saves and loads; the uncompressed index gives the exact scores, the eigen projection refuses it."""
    from concept_influence.index import GradientIndex
    from concept_influence.index.subspace import make_spaces

    optimizer = torch.optim.AdamW(tl_adapter.model.parameters(), lr=1e-2, amsgrad=False)
    _train(tl_adapter, tokenized, optimizer)
    folder = _checkpoint(tmp_path, optimizer)
    curvature = AdamStateCurvature.from_checkpoint(tl_adapter, folder / "optimizer.pt")
    concept, train = _concept(tl_adapter, tokenized), tokenized[:6]
    maps = tl_adapter.linear_maps(max_block=1)
    got = ConceptInfluence(concept, curvature).score(tl_adapter, train, batch_size=3, progress=False).column(0)
    ref = _explicit(tl_adapter, optimizer, lambda: _mean_f(tl_adapter, concept), train, maps)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()

    once = AdamStateCurvature.from_checkpoint(tl_adapter, folder, power=1)
    v = {m.name: torch.randn(2, *m.shape) for m in maps}
    twice = curvature.precondition(once.precondition(v))
    for m in maps:
        assert torch.allclose(once.precondition(v)[m.name], v[m.name] * once.scales[m.name])
        assert torch.allclose(twice[m.name], v[m.name] * once.scales[m.name] ** 3, rtol=1e-5)

    loaded = Curvature.load(curvature.save(tmp_path / "saved"), tl_adapter)
    assert isinstance(loaded, AdamStateCurvature) and loaded.power == 2 and loaded.source == curvature.source
    assert all(torch.equal(loaded.scales[n], curvature.scales[n]) for n in curvature.scales)
    assert Curvature.load(once.save(tmp_path / "once")).power == 1

    index = GradientIndex.build(tmp_path / "i", tl_adapter, train, curvature, projection="identity", rank=10**6,
                                dtype="float32", progress=False)
    estimator = ConceptInfluence(concept, curvature)
    exact = estimator.score(tl_adapter, train, batch_size=3, progress=False).values
    assert np.abs(index.score(estimator, tl_adapter, progress=False).values - exact).max() < 1e-4 * np.abs(exact).max()
    with pytest.raises(ValueError, match="needs a curvature method declaring has_eigenbasis .*; adam_state does not"):
        make_spaces("eigen", 4, maps, curvature)
    with pytest.raises(ValueError, match="power must be one of 1, 2"):
        AdamStateCurvature(curvature.scales, power=3)


def _one_line_error(call, *fragments):
    with pytest.raises(CurvatureError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


def test_bad_optimizer_files_are_one_line_errors_naming_the_file(gpt2, tmp_path):
    adapter, optimizer, folder = gpt2
    bad = tmp_path / "evil"
    bad.mkdir()
    torch.save({"state": {}, "param_groups": [], "payload": Evil()}, bad / "optimizer.pt")
    _one_line_error(lambda: AdamStateCurvature.from_checkpoint(adapter, bad), str(bad / "optimizer.pt"),
                    "weights_only=True")
    (bad / "optimizer.pt").write_bytes(b"not a torch file")
    _one_line_error(lambda: AdamStateCurvature.from_checkpoint(adapter, bad), str(bad / "optimizer.pt"))
    _one_line_error(lambda: AdamStateCurvature.from_checkpoint(adapter, tmp_path / "none"), "no such file")
    torch.save({"weights": torch.zeros(2)}, bad / "optimizer.pt")
    _one_line_error(lambda: AdamStateCurvature.from_checkpoint(adapter, bad), "not an optimizer state_dict")

    state = optimizer.state_dict()  # one tracked map's second moments in the wrong shape
    weight = adapter.linear_maps()[0].weight
    position = next(i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]) if p is weight)
    state["state"][position]["exp_avg_sq"] = state["state"][position]["exp_avg_sq"].T.contiguous()
    torch.save(state, bad / "optimizer.pt")
    _one_line_error(lambda: AdamStateCurvature.from_checkpoint(adapter, bad), str(bad / "optimizer.pt"),
                    f"map {adapter.linear_maps()[0].name}", "param_names")

    state = optimizer.state_dict()  # a parameter the fine-tune did not train
    del state["state"][position]["exp_avg_sq"]
    torch.save(state, bad / "optimizer.pt")
    _one_line_error(lambda: AdamStateCurvature.from_checkpoint(adapter, bad), str(bad / "optimizer.pt"),
                    adapter.linear_maps()[0].name, "exp_avg_sq")


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_the_trainer_groups_follow_transformers_decay_rule(tokenizer, kind):
    from transformers import Trainer

    from concept_influence.curvature.optimizer_state import trainer_parameter_order

    model = _hf_model(kind, len(tokenizer))
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    assert [[n for n, _ in g] for g in trainer_parameter_order(model)] == \
        [[n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]]


def test_a_lora_fine_tunes_optimizer_covers_its_factors_only(tokenizer, tokenized, tmp_path):
    """A PEFT model's Trainer optimizer holds the trained LoRA factors (requires_grad) only: the factors get their
    correction and the exact scores; the frozen base weights (track="full") are refused by name."""
    peft = pytest.importorskip("peft")
    from transformers import Trainer

    torch.manual_seed(0)
    model = peft.get_peft_model(_hf_model("llama", len(tokenizer)), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)).eval()
    decay = set(Trainer.get_decay_parameter_names(None, model))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in trained if n in decay], "weight_decay": 0.0},
                                   {"params": [p for n, p in trained if n not in decay], "weight_decay": 0.0}], lr=1e-2)
    adapter = HFCausalLMAdapter(model, tokenizer)
    _train(adapter, tokenized, optimizer)
    folder = _checkpoint(tmp_path, optimizer)
    for p in model.parameters():  # as loaded for scoring (is_trainable=False): nothing requires grad
        p.requires_grad_(False)
    curvature = AdamStateCurvature.from_checkpoint(adapter, folder)
    assert all(".lora_" in name for name in curvature.map_names)
    test, train = tokenized[8:10], tokenized[:5]
    got = InfluenceFunction(test, curvature).score(adapter, train, batch_size=3, progress=False).column(0)
    maps = adapter.linear_maps()
    for m in maps:
        m.weight.requires_grad_(True)
    ref = _explicit(adapter, optimizer, _minus_mean_loss(adapter, test), train, maps)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    full = HFCausalLMAdapter(model, tokenizer, track="full").linear_maps()
    _one_line_error(lambda: AdamStateCurvature.from_checkpoint(adapter, folder, full), "is not among the parameters",
                    full[0].name)
