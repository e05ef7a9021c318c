"""Model adapters: captured per-token activations/gradients, losses, activations at hooks, maps, fingerprints."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from concept_influence.data import collate
from concept_influence.models import (
    HFCausalLMAdapter,
    HookedTransformerAdapter,
    HookError,
    LinearMap,
    as_adapter,
    block_of_hook,
)
from concept_influence.toy.small_model import build_small_model

# ---------------------------------------------------------------------------------------------- helpers


def _is_tl(adapter):
    return isinstance(adapter, HookedTransformerAdapter)


def _raw_logits(adapter, input_ids):
    """Logits straight from the wrapped model for an unpadded ``[1, T]`` input."""
    with torch.no_grad():
        if _is_tl(adapter):
            return adapter.model(input_ids, return_type="logits")
        return adapter.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


def _reference_activation(adapter, batch, hook_name):
    """The activation at ``hook_name`` from a full, ordinary forward (TL cache / HF hidden_states)."""
    with torch.no_grad():
        if _is_tl(adapter):
            _, cache = adapter.model.run_with_cache(batch.input_ids)
            return cache[hook_name]
        out = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        layer = block_of_hook(hook_name)
        if hook_name.endswith("hook_resid_pre"):
            return out.hidden_states[layer]
        assert layer < adapter.n_blocks - 1, "HF applies the final norm to the last hidden state"
        return out.hidden_states[layer + 1]


def _final_norm(adapter):
    base = adapter.model.base_model
    return getattr(base, "ln_f", None) or getattr(base, "norm")


def _real(batch):
    return batch.attention_mask.bool()


# ---------------------------------------------------------------------------------------------- capture


def _check_capture(adapter, maps, cap, expect_names):
    assert set(cap.output_grads) == set(expect_names)
    for m in maps:
        if m.name not in expect_names:
            continue
        a, g = cap.inputs[m.name], cap.output_grads[m.name]
        assert a.ndim == 3 and g.ndim == 3
        d_out, d_in = m.shape
        assert a.shape[-1] == d_in and g.shape[-1] == d_out
        est = torch.einsum("bto,bti->oi", g.double(), a.double())
        ref = m.to_matrix(m.weight.grad).double()
        assert ref.shape == est.shape == (d_out, d_in)
        assert ref.abs().max() > 0, m.name
        rel = (est - ref).norm() / ref.norm()
        assert rel <= 1e-5, f"{m.name}: relative error {rel:.2e}"


def test_capture_gives_weight_gradient_for_loss(any_adapter, tokenized):
    adapter = any_adapter
    batch = collate(tokenized[:6], adapter.pad_token_id)
    assert (batch.attention_mask == 0).any(), "the batch should be padded"
    maps = adapter.linear_maps()
    adapter.model.zero_grad(set_to_none=True)
    with adapter.capture(maps) as cap:
        adapter.per_example_loss(batch).sum().backward()
    _check_capture(adapter, maps, cap, [m.name for m in maps])
    # hooks are removed after the context: another forward records nothing new
    cap.inputs.clear()
    with torch.no_grad():
        adapter.per_example_loss(batch)
    assert cap.inputs == {}


def test_capture_hf_all_architectures(hf_adapter, tokenized):
    adapter = hf_adapter
    batch = collate(tokenized[3:10], adapter.pad_token_id)
    maps = adapter.linear_maps()
    adapter.model.zero_grad(set_to_none=True)
    with adapter.capture(maps) as cap:
        adapter.per_example_loss(batch).sum().backward()
    _check_capture(adapter, maps, cap, [m.name for m in maps])


def test_capture_for_activation_function_only_earlier_blocks(any_adapter, tokenized):
    """A function of the block-0 residual gives gradient to block-0 maps only; Σ g aᵀ is still exact."""
    adapter = any_adapter
    batch = collate(tokenized[:5], adapter.pad_token_id)
    maps = adapter.linear_maps()
    torch.manual_seed(1)
    v = torch.randn(adapter.d_model)
    adapter.model.zero_grad(set_to_none=True)
    with adapter.capture(maps) as cap:
        acts = adapter.activations(batch, "blocks.0.hook_resid_post")
        (acts @ v)[batch.response_mask].mean().backward()
    block0 = [m.name for m in maps if m.block == 0]
    _check_capture(adapter, maps, cap, block0)
    assert all(m.weight.grad is None for m in maps if m.block == 1)


def test_from_matrix_inverts_to_matrix(any_adapter):
    for m in any_adapter.linear_maps():
        w = m.weight.detach()
        mat = m.to_matrix(w)
        assert mat.shape == m.shape
        assert torch.equal(m.from_matrix(mat), w)
        r = torch.randn(m.shape)
        assert torch.equal(m.to_matrix(m.from_matrix(r)), r)
        assert m.from_matrix(r).shape == w.shape


def test_map_matrix_acts_like_the_layer(any_adapter, tokenized):
    """out = W a (+ bias) with W = to_matrix(weight), checked on captured activations."""
    adapter = any_adapter
    batch = collate(tokenized[:3], adapter.pad_token_id)
    maps = adapter.linear_maps()
    outs = {}
    handles = [m.output_module.register_forward_hook(lambda mod, args, out, n=m.name: outs.__setitem__(n, out)) for m in maps]
    try:
        with torch.no_grad(), adapter.capture(maps) as cap:
            adapter.per_example_loss(batch)
    finally:
        for h in handles:
            h.remove()
    for m in maps:
        a = cap.inputs[m.name]
        out = outs[m.name].reshape(a.shape[0], a.shape[1], -1)
        lin = a @ m.to_matrix(m.weight.detach()).T
        # the bias (if any) is a constant row: out - W a is the same at every token
        diff = (out - lin).reshape(-1, out.shape[-1])
        assert torch.allclose(diff, diff[:1].expand_as(diff), atol=1e-5), m.name


# ---------------------------------------------------------------------------------------------- losses


def _explicit_loss(adapter, example, tokens="response"):
    ids = torch.tensor([example.input_ids])
    logits = _raw_logits(adapter, ids)[0]
    start = example.response_start if tokens == "response" else 1
    # logits at position t predict token t + 1
    return F.cross_entropy(logits[start - 1 : -1].double(), ids[0, start:], reduction="mean")


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_per_example_loss_matches_explicit_computation(any_adapter, tokenized, tokens):
    adapter = any_adapter
    batch = collate(tokenized, adapter.pad_token_id)
    with torch.no_grad():
        got = adapter.per_example_loss(batch, tokens=tokens)
    assert got.shape == (len(tokenized),)
    expected = torch.stack([_explicit_loss(adapter, e, tokens) for e in tokenized]).float()
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert (got > 0).all()


def test_per_example_loss_response_differs_from_all(any_adapter, tokenized):
    batch = collate(tokenized, any_adapter.pad_token_id)
    with torch.no_grad():
        resp = any_adapter.per_example_loss(batch)
        alltok = any_adapter.per_example_loss(batch, tokens="all")
    assert not torch.allclose(resp, alltok)


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_per_example_loss_batch_size_invariant(any_adapter, tokenized, tokens):
    adapter = any_adapter
    assert len(tokenized) == 12
    with torch.no_grad():
        together = adapter.per_example_loss(collate(tokenized, adapter.pad_token_id), tokens=tokens)
        alone = torch.cat([adapter.per_example_loss(collate([e], adapter.pad_token_id), tokens=tokens) for e in tokenized])
        reversed_ = adapter.per_example_loss(collate(tokenized[::-1], adapter.pad_token_id), tokens=tokens).flip(0)
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together, reversed_, atol=1e-5)


def test_per_example_loss_hf_architectures(hf_adapter, tokenized):
    with torch.no_grad():
        together = hf_adapter.per_example_loss(collate(tokenized, hf_adapter.pad_token_id))
        alone = torch.cat([hf_adapter.per_example_loss(collate([e], hf_adapter.pad_token_id)) for e in tokenized])
    expected = torch.stack([_explicit_loss(hf_adapter, e) for e in tokenized]).float()
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together, expected, atol=1e-5)


def test_per_example_loss_rejects_unknown_tokens(tl_adapter, tokenized):
    with pytest.raises(ValueError, match="tokens"):
        tl_adapter.per_example_loss(collate(tokenized[:2]), tokens="prompt")


def test_per_example_loss_has_gradient(tl_adapter, tokenized):
    loss = tl_adapter.per_example_loss(collate(tokenized[:2], tl_adapter.pad_token_id))
    assert loss.requires_grad


# ---------------------------------------------------------------------------------------------- activations


def _hooks_for(adapter):
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    if _is_tl(adapter):
        hooks += ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.mlp.hook_post", "ln_final.hook_normalized",
                  "hook_embed"]
    return hooks


@pytest.mark.parametrize("stop_early", [True, False])
def test_activations_equal_full_forward(any_adapter, tokenized, stop_early):
    adapter = any_adapter
    batch = collate(tokenized[:7], adapter.pad_token_id)
    real = _real(batch)
    for hook in _hooks_for(adapter):
        with torch.no_grad():
            got = adapter.activations(batch, hook, stop_early=stop_early)
        ref = _reference_activation(adapter, batch, hook)
        assert got.shape == ref.shape, hook
        assert torch.allclose(got[real], ref[real], atol=1e-5), hook


def test_hf_final_block_resid_post_is_before_final_norm(hf_adapter, tokenized):
    adapter = hf_adapter
    batch = collate(tokenized[:4], adapter.pad_token_id)
    last = adapter.n_blocks - 1
    with torch.no_grad():
        post = adapter.activations(batch, f"blocks.{last}.hook_resid_post")
        out = adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        normed = _final_norm(adapter)(post)
    real = _real(batch)
    assert torch.allclose(normed[real], out.hidden_states[-1][real], atol=1e-5)
    assert not torch.allclose(post[real], out.hidden_states[-1][real], atol=1e-3)


def test_activations_hf_architectures(hf_adapter, tokenized):
    batch = collate(tokenized[2:9], hf_adapter.pad_token_id)
    real = _real(batch)
    for hook in ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"):
        with torch.no_grad():
            got = hf_adapter.activations(batch, hook)
        assert torch.allclose(got[real], _reference_activation(hf_adapter, batch, hook)[real], atol=1e-5), hook


def _later_modules(adapter):
    if _is_tl(adapter):
        return adapter.model.blocks[1], adapter.model.unembed
    return adapter.blocks[1], adapter.model.get_output_embeddings()


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.0.hook_resid_pre"])
def test_stop_early_really_stops(any_adapter, tokenized, hook):
    adapter = any_adapter
    batch = collate(tokenized[:3], adapter.pad_token_id)
    later_block, head = _later_modules(adapter)
    calls = []
    handles = [later_block.register_forward_hook(lambda *a: calls.append("block1")),
               head.register_forward_hook(lambda *a: calls.append("head"))]
    try:
        with torch.no_grad():
            adapter.activations(batch, hook)
        assert calls == []
        with torch.no_grad():
            adapter.activations(batch, hook, stop_early=False)
        assert "block1" in calls  # (TL skips the unembed when no logits are asked for)
    finally:
        for h in handles:
            h.remove()
    # the adapter leaves no hooks behind
    assert len(later_block._forward_hooks) == 0
    with torch.no_grad():
        adapter.activations(batch, hook)  # works again


def test_activations_keep_graph_unless_no_grad(any_adapter, tokenized):
    batch = collate(tokenized[:2], any_adapter.pad_token_id)
    assert any_adapter.activations(batch, "blocks.0.hook_resid_post").requires_grad
    with torch.no_grad():
        assert not any_adapter.activations(batch, "blocks.0.hook_resid_post").requires_grad


def test_activation_shape(any_adapter, tokenized):
    batch = collate(tokenized[:4], any_adapter.pad_token_id)
    with torch.no_grad():
        acts = any_adapter.activations(batch, "blocks.1.hook_resid_pre")
    assert acts.shape == (4, batch.input_ids.shape[1], any_adapter.d_model)


# ---------------------------------------------------------------------------------------------- hook errors


def test_unknown_hook_lists_close_matches(any_adapter, tokenized):
    batch = collate(tokenized[:2], any_adapter.pad_token_id)
    with pytest.raises(HookError) as info:
        any_adapter.activations(batch, "blocks.0.hook_resid_pots")
    msg = str(info.value)
    assert "blocks.0.hook_resid_pots" in msg and "close matches" in msg and "blocks.0.hook_resid_post" in msg
    assert not msg.startswith("'")  # not KeyError's quoted repr
    assert isinstance(info.value, KeyError)
    with pytest.raises(HookError, match="unknown hook name") as info:
        any_adapter.check_hook("something.completely.different")
    assert "close matches" not in str(info.value)


@pytest.mark.parametrize("hook", ["blocks.2.hook_resid_post", "blocks.17.hook_resid_pre"])
def test_layer_out_of_range(any_adapter, hook):
    with pytest.raises(HookError) as info:
        any_adapter.check_hook(hook)
    msg = str(info.value)
    assert "out of range" in msg and f"layer {block_of_hook(hook)}" in msg and "0..1" in msg


def test_check_hook_returns_block(any_adapter):
    assert any_adapter.check_hook("blocks.1.hook_resid_post") == 1
    assert any_adapter.check_hook("blocks.0.hook_resid_pre") == 0
    for name in any_adapter.hook_names():
        assert any_adapter.check_hook(name) == block_of_hook(name)


def test_block_of_hook():
    assert block_of_hook("blocks.12.hook_resid_post") == 12
    assert block_of_hook("blocks.0.attn.hook_z") == 0
    assert block_of_hook("hook_embed") is None
    assert block_of_hook("ln_final.hook_normalized") is None


def test_hf_hook_names(hf_adapter):
    points = ["hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_post"]
    assert hf_adapter.hook_names() == [f"blocks.{l}.{p}" for l in range(2) for p in points]


def test_hf_attention_and_mlp_outputs_add_up_to_the_block(hf_adapter, tokenized):
    """resid_post = resid_pre + attn_out + mlp_out, and the MLP's down projection of mlp.hook_post is mlp_out."""
    batch = collate(tokenized[:4], hf_adapter.pad_token_id)
    with torch.no_grad():
        acts = {p: hf_adapter.activations(batch, f"blocks.1.{p}")
                for p in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_post")}
        down, _ = hf_adapter._hook_point("blocks.1.mlp.hook_post")
        torch.testing.assert_close(acts["hook_resid_post"], acts["hook_resid_pre"] + acts["hook_attn_out"] + acts["hook_mlp_out"])
        torch.testing.assert_close(down(acts["mlp.hook_post"]), acts["hook_mlp_out"])
    d_mlp = 128 if hf_adapter.model.config.model_type == "gpt2" else 64  # GPT-2: 4 × d_model
    assert hf_adapter.hook_width("blocks.1.hook_mlp_out") == 32 and hf_adapter.hook_width("blocks.0.mlp.hook_post") == d_mlp


def test_hf_edit_at_the_mlp_output_reaches_the_residual_stream(hf_adapter, tokenized):
    batch = collate(tokenized[:2], hf_adapter.pad_token_id)
    with torch.no_grad():
        before = hf_adapter.activations(batch, "blocks.0.hook_resid_post")
        with hf_adapter.edit_activation("blocks.0.hook_mlp_out", lambda a: a + 1.0):
            after = hf_adapter.activations(batch, "blocks.0.hook_resid_post")
    torch.testing.assert_close(after, before + 1.0)


# ---------------------------------------------------------------------------------------------- linear maps


def test_tl_linear_maps(tl_adapter):
    maps = tl_adapter.linear_maps()
    kinds = ["attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.W_in", "mlp.W_out"]
    assert sorted(m.name for m in maps) == sorted(f"blocks.{l}.{k}" for l in range(2) for k in kinds)
    cfg = tl_adapter.model.cfg
    by_name = {m.name: m for m in maps}
    hd = cfg.n_heads * cfg.d_head
    for l in range(2):
        assert by_name[f"blocks.{l}.attn.W_Q"].shape == (hd, cfg.d_model)
        assert by_name[f"blocks.{l}.attn.W_O"].shape == (cfg.d_model, hd)
        assert by_name[f"blocks.{l}.mlp.W_in"].shape == (cfg.d_mlp, cfg.d_model)
        assert by_name[f"blocks.{l}.mlp.W_out"].shape == (cfg.d_model, cfg.d_mlp)
        assert by_name[f"blocks.{l}.attn.W_Q"].weight is tl_adapter.model.blocks[l].attn.W_Q
    assert all(m.block == block_of_hook(m.name) for m in maps)
    assert all(isinstance(m, LinearMap) for m in maps)


def test_linear_maps_max_block(any_adapter):
    all_maps = any_adapter.linear_maps()
    first = any_adapter.linear_maps(max_block=0)
    assert first and all(m.block == 0 and m.name.startswith("blocks.0.") for m in first)
    assert [m.name for m in first] == [m.name for m in all_maps if m.block == 0]
    assert len(all_maps) == 2 * len(first)
    assert {m.block for m in all_maps} == {0, 1}
    assert [m.name for m in any_adapter.linear_maps(max_block=99)] == [m.name for m in all_maps]


HF_MAPS = {
    "gpt2": {"attn.c_attn": (96, 32), "attn.c_proj": (32, 32), "mlp.c_fc": (128, 32), "mlp.c_proj": (32, 128)},
    "llama": {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32), "self_attn.v_proj": (16, 32),
              "self_attn.o_proj": (32, 32), "mlp.gate_proj": (64, 32), "mlp.up_proj": (64, 32), "mlp.down_proj": (32, 64)},
}
HF_MAPS["qwen2"] = HF_MAPS["llama"]


def test_hf_linear_maps(hf_adapter):
    kind = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[type(hf_adapter.model).__name__]
    maps = hf_adapter.linear_maps()
    expected = {f"blocks.{l}.{k}": s for l in range(2) for k, s in HF_MAPS[kind].items()}
    assert {m.name: m.shape for m in maps} == expected


# ---------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint(tokenizer):
    a = build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=64, seed=0)
    b = build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=64, seed=0)
    c = build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=64, seed=1)
    fa = a.fingerprint()
    assert isinstance(fa, str) and len(fa) == 16
    assert fa == a.fingerprint() == b.fingerprint()
    assert c.fingerprint() != fa
    w = a.model.blocks[1].mlp.W_out
    with torch.no_grad():
        old = w[3, 5].item()
        w[3, 5] += 0.01
    assert a.fingerprint() != fa
    with torch.no_grad():
        w[3, 5] = old
    assert a.fingerprint() == fa


def test_fingerprint_hf(hf_adapter):
    fp = hf_adapter.fingerprint()
    assert fp == hf_adapter.fingerprint()
    p = next(m.weight for m in hf_adapter.linear_maps() if m.block == 1)
    with torch.no_grad():
        p.view(-1)[-1] += 0.5
    assert hf_adapter.fingerprint() != fp


# ---------------------------------------------------------------------------------------------- as_adapter


def test_as_adapter_hooked_transformer(tl_adapter, tokenizer):
    wrapped = as_adapter(tl_adapter.model)
    assert isinstance(wrapped, HookedTransformerAdapter)
    assert wrapped.model is tl_adapter.model
    assert wrapped.tokenizer is tl_adapter.model.tokenizer
    assert wrapped.pad_token_id == tokenizer.pad_token_id
    assert (wrapped.n_blocks, wrapped.d_model) == (2, 32)
    assert as_adapter(tl_adapter) is tl_adapter
    assert as_adapter(tl_adapter.model, tokenizer).tokenizer is tokenizer


def test_as_adapter_hf_model(hf_adapter, tokenizer):
    model = hf_adapter.model
    wrapped = as_adapter(model, tokenizer)
    assert isinstance(wrapped, HFCausalLMAdapter)
    assert (wrapped.n_blocks, wrapped.d_model) == (2, 32)
    assert wrapped.model is model and wrapped.tokenizer is tokenizer
    with pytest.raises(ValueError, match="tokenizer"):
        as_adapter(model)


@pytest.mark.parametrize("obj", [nn.Linear(3, 3), "gpt2", object()])
def test_as_adapter_unsupported(obj):
    with pytest.raises(TypeError, match="unsupported model type"):
        as_adapter(obj)


def test_tl_adapter_rejects_split_qkv(tl_adapter):
    tl_adapter.model.cfg.use_split_qkv_input = True
    with pytest.raises(ValueError, match="use_split_qkv_input"):
        HookedTransformerAdapter(tl_adapter.model)


def test_pad_token_id_defaults_to_zero(tl_adapter):
    class NoPad:
        pad_token_id = None

    assert HookedTransformerAdapter(tl_adapter.model, NoPad()).pad_token_id == 0


def test_capture_releases_the_graph(tl_adapter, tokenized):
    """After the capture context ends nothing keeps the batch's graph alive (a hook <-> capture cycle through
    autograd's C++ hook storage would leak every batch's graph: 24 GB in a benchmark once)."""
    import gc
    import weakref

    maps = tl_adapter.linear_maps()
    batch = collate(tokenized[:4], tl_adapter.pad_token_id)
    with tl_adapter.capture(maps) as cap:
        loss = tl_adapter.per_example_loss(batch).sum()
        outputs = list(cap.outputs.values())
        assert len(outputs) == len(maps)
        torch.autograd.grad(loss, outputs)
        ref = weakref.ref(outputs[0])
    del loss, outputs
    gc.collect()
    assert ref() is None
    assert cap.output_grads and not cap.outputs
