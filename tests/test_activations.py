"""collect_activations and token reductions against direct single-example computations."""

import pytest
import torch

from concept_influence.activations import collect_activations
from concept_influence.data import TokenizedExample, collate
from concept_influence.models import HookedTransformerAdapter, HookError, block_of_hook
from probes.activations import REDUCTIONS, Activations, reduce_tokens, token_mask

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]


def _direct(adapter, example: TokenizedExample, hook_name):
    """``[T, d]`` activations of one unpadded example from an ordinary full forward."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        if isinstance(adapter, HookedTransformerAdapter):
            _, cache = adapter.model.run_with_cache(ids)
            return cache[hook_name][0]
        out = adapter.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        layer = block_of_hook(hook_name)
        return out.hidden_states[layer if hook_name.endswith("hook_resid_pre") else layer + 1][0]


def _expected(adapter, examples, hook_name, reduction):
    rows = []
    for e in examples:
        acts = _direct(adapter, e, hook_name)
        if reduction == "response_mean":
            rows.append(acts[e.response_start :].mean(0, keepdim=True))
        elif reduction == "last_prompt":
            rows.append(acts[e.response_start - 1 : e.response_start])
        elif reduction == "prompt_mean":
            rows.append(acts[: e.response_start].mean(0, keepdim=True))
        else:
            rows.append(acts)
    return torch.cat(rows)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("hook", HOOKS)
def test_collect_activations_matches_direct(any_adapter, tokenized, reduction, hook):
    res = collect_activations(any_adapter, tokenized, hook, reduction=reduction, batch_size=5, progress=False)
    assert isinstance(res, Activations)
    assert res.ids == [e.id for e in tokenized]
    assert (res.hook_name, res.reduction) == (hook, reduction)
    expected = _expected(any_adapter, tokenized, hook, reduction)
    assert res.values.shape == expected.shape
    assert res.values.dtype == torch.float32 and res.values.device.type == "cpu"
    assert torch.allclose(res.values, expected, atol=1e-5), (res.values - expected).abs().max()
    assert not res.values.requires_grad
    if reduction == "all_tokens":
        assert res.values.shape[0] == sum(len(e.input_ids) for e in tokenized)
    else:
        assert res.values.shape == (len(tokenized), any_adapter.d_model)
        assert res.example_index is None


def test_all_tokens_example_index(any_adapter, tokenized):
    res = collect_activations(any_adapter, tokenized, "blocks.0.hook_resid_post", "all_tokens", batch_size=5, progress=False)
    idx = res.example_index
    assert idx is not None and idx.shape == (res.values.shape[0],)
    expected_idx = torch.cat([torch.full((len(e.input_ids),), i) for i, e in enumerate(tokenized)])
    assert torch.equal(idx.long(), expected_idx)
    for i, e in enumerate(tokenized):
        rows = res.values[idx == i]
        assert torch.allclose(rows, _direct(any_adapter, e, "blocks.0.hook_resid_post"), atol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_batch_size_invariance(any_adapter, tokenized, reduction):
    hook = "blocks.0.hook_resid_post"
    runs = [collect_activations(any_adapter, tokenized, hook, reduction, batch_size=bs, progress=False) for bs in (1, 4, 12, 50)]
    for r in runs[1:]:
        assert r.ids == runs[0].ids
        assert torch.allclose(r.values, runs[0].values, atol=1e-5)
        if reduction == "all_tokens":
            assert torch.equal(r.example_index, runs[0].example_index)


def test_reductions_differ(tl_adapter, tokenized):
    vals = {r: collect_activations(tl_adapter, tokenized, "blocks.0.hook_resid_post", r, progress=False).values
            for r in REDUCTIONS}
    assert not torch.allclose(vals["response_mean"], vals["last_prompt"])
    assert vals["all_tokens"].shape[0] > vals["response_mean"].shape[0]


def test_other_tl_hooks(tl_adapter, tokenized):
    for hook in ("blocks.1.hook_resid_post", "blocks.0.ln2.hook_normalized"):
        res = collect_activations(tl_adapter, tokenized[:6], hook, "response_mean", batch_size=4, progress=False)
        assert torch.allclose(res.values, _expected(tl_adapter, tokenized[:6], hook, "response_mean"), atol=1e-5)


def test_unknown_reduction(tl_adapter, tokenized):
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        collect_activations(tl_adapter, tokenized, "blocks.0.hook_resid_post", reduction="max", progress=False)
    batch = collate(tokenized[:2])
    with pytest.raises(ValueError, match="unknown reduction"):
        token_mask(batch, "first")
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce_tokens(torch.zeros(2, batch.input_ids.shape[1], 3), batch, "first")


def test_unknown_hook(any_adapter, tokenized):
    with pytest.raises(HookError, match="blocks.0.hook_resid_post"):
        collect_activations(any_adapter, tokenized, "blocks.0.hook_resid_pst", progress=False)
    with pytest.raises(HookError, match="out of range"):
        collect_activations(any_adapter, tokenized, "blocks.9.hook_resid_post", progress=False)


def test_token_mask_and_reduce_tokens_by_hand():
    a = TokenizedExample("a", (5, 6, 7, 8), 2)
    b = TokenizedExample("b", (9, 10, 11), 1)
    batch = collate([a, b], pad_token_id=0)
    assert token_mask(batch, "response_mean").tolist() == [[False, False, True, True], [False, True, True, False]]
    assert token_mask(batch, "last_prompt").tolist() == [[False, True, False, False], [True, False, False, False]]
    assert token_mask(batch, "all_tokens").tolist() == [[True, True, True, True], [True, True, True, False]]
    acts = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    assert torch.equal(reduce_tokens(acts, batch, "response_mean"), torch.stack([acts[0, 2:].mean(0), acts[1, 1:3].mean(0)]))
    assert torch.equal(reduce_tokens(acts, batch, "last_prompt"), torch.stack([acts[0, 1], acts[1, 0]]))
    assert torch.equal(reduce_tokens(acts, batch, "all_tokens"), torch.stack([acts[0].mean(0), acts[1, :3].mean(0)]))
    # keeps the graph
    x = acts.clone().requires_grad_()
    reduce_tokens(x, batch, "response_mean").sum().backward()
    assert x.grad[0, 2, 0] == 0.5 and x.grad[0, 0, 0] == 0 and x.grad[1, 3, 0] == 0


def test_collect_activations_empty(tl_adapter):
    res = collect_activations(tl_adapter, [], "blocks.0.hook_resid_post", progress=False)
    assert res.values.shape == (0, tl_adapter.d_model) and res.ids == []
