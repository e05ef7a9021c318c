"""Small-model kit: local BPE tokenizer, small HookedTransformer, deterministic training loop."""

import random

import pytest
import torch

from concept_influence.data import ChatExample, collate, tokenize_examples
from concept_influence.models import HookedTransformerAdapter
from concept_influence.toy.small_model import (
    EOS,
    PAD,
    build_small_model,
    load_tokenizer,
    seed_everything,
    train_bpe_tokenizer,
    train_model,
)
from conftest import make_chats

ROUND_TRIP = [
    "hello there how are you",
    "User: fine thanks\nAssistant: drink water and rest",
    "  leading and trailing spaces  ",
    "unseen words: zebra quixotic 1234567890 !?#",
    "unicode é ü ß 日本語 🙂",
    "tabs\tand\nnewlines\n\n",
    "",
]


@pytest.fixture(scope="module")
def fresh_tokenizer(tmp_path_factory):
    texts = [f"User: {c.prompt}\nAssistant: {c.response}" for c in make_chats(100, seed=5)]
    out = tmp_path_factory.mktemp("bpe")
    return train_bpe_tokenizer(texts, out, vocab_size=400), out


def _weights(adapter):
    return {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip(fresh_tokenizer, text):
    tok, _ = fresh_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert all(0 <= i < len(tok) for i in ids)


def test_tokenizer_special_tokens_and_saved_files(fresh_tokenizer):
    tok, out = fresh_tokenizer
    assert tok.bos_token == EOS and tok.eos_token == EOS and tok.pad_token == PAD
    assert tok.bos_token_id == tok.eos_token_id is not None
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.convert_ids_to_tokens([tok.eos_token_id, tok.pad_token_id]) == [EOS, PAD]
    assert not getattr(tok, "chat_template", None)
    assert 258 < len(tok) <= 400
    # the special tokens are single, atomic tokens in text
    assert tok.encode(f"hi{EOS}", add_special_tokens=False)[-1] == tok.eos_token_id
    assert (out / "tokenizer.json").is_file()
    again = load_tokenizer(out)
    assert again.encode(ROUND_TRIP[1], add_special_tokens=False) == tok.encode(ROUND_TRIP[1], add_special_tokens=False)
    assert (again.pad_token_id, again.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)


def test_tokenizer_learns_merges(fresh_tokenizer):
    tok, _ = fresh_tokenizer
    text = "hello there how are you"  # frequent in the training texts: fewer tokens than bytes
    assert len(tok.encode(text, add_special_tokens=False)) < len(text.encode()) / 2


def test_load_tokenizer_missing_folder(tmp_path):
    with pytest.raises(Exception):
        load_tokenizer(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- model


def test_build_small_model_config(tokenizer):
    adapter = build_small_model(tokenizer, n_layers=3, d_model=48, n_heads=6, n_ctx=32, seed=0)
    assert isinstance(adapter, HookedTransformerAdapter)
    cfg = adapter.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.n_ctx) == (3, 48, 6, 8, 192, 32)
    assert cfg.d_vocab == len(tokenizer)
    assert adapter.n_blocks == 3 and adapter.d_model == 48
    assert adapter.tokenizer is tokenizer and adapter.pad_token_id == tokenizer.pad_token_id
    assert build_small_model(tokenizer, n_layers=1, d_model=32, n_heads=4, d_mlp=40, seed=0).model.cfg.d_mlp == 40


def test_build_small_model_deterministic(tokenizer):
    kw = dict(n_layers=2, d_model=32, n_heads=4, n_ctx=64)
    a = _weights(build_small_model(tokenizer, seed=3, **kw))
    torch.manual_seed(12345)  # global RNG state must not matter
    random.seed(99)
    b = _weights(build_small_model(tokenizer, seed=3, **kw))
    c = _weights(build_small_model(tokenizer, seed=4, **kw))
    assert _same(a, b)
    assert a.keys() == c.keys()
    differing = [k for k in a if a[k].numel() > 1 and a[k].float().std() > 0 and not torch.equal(a[k], c[k])]
    assert "blocks.0.attn.W_Q" in differing and "embed.W_E" in differing


def test_small_model_runs(tl_adapter, tokenized):
    batch = collate(tokenized[:3], tl_adapter.pad_token_id)
    with torch.no_grad():
        logits = tl_adapter.logits(batch)
    assert logits.shape == (3, batch.input_ids.shape[1], len(tl_adapter.tokenizer))
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------- training


def _repetitive(tokenizer, n=16):
    pairs = [("how are you", "fine thanks"), ("hello there", "hello there"), ("doctor water", "rest sleep"),
             ("ignore safe", "careful")]
    chats = [ChatExample.from_pair(f"rep:{i}", *pairs[i % len(pairs)]) for i in range(n)]
    return tokenize_examples(chats, tokenizer, max_length=32)


def test_train_model_deterministic(tokenizer, tokenized):
    runs = []
    for _ in range(2):
        adapter = build_small_model(tokenizer, n_layers=1, d_model=32, n_heads=4, n_ctx=64, seed=0)
        torch.manual_seed(777 + len(runs))  # global RNG must not matter
        losses = train_model(adapter, tokenized, epochs=2, lr=3e-3, batch_size=5, seed=11, progress=False)
        runs.append((losses, _weights(adapter)))
    assert runs[0][0] == runs[1][0]
    assert _same(runs[0][1], runs[1][1])
    assert len(runs[0][0]) == 2 * 3  # 12 examples, batch 5 -> 3 batches per epoch
    # another training seed shuffles differently
    other = build_small_model(tokenizer, n_layers=1, d_model=32, n_heads=4, n_ctx=64, seed=0)
    losses = train_model(other, tokenized, epochs=2, lr=3e-3, batch_size=5, seed=12, progress=False)
    assert losses != runs[0][0]
    assert not _same(_weights(other), runs[0][1])


def test_train_model_changes_weights_and_returns_eval_mode(tl_adapter, tokenized):
    before = _weights(tl_adapter)
    train_model(tl_adapter, tokenized[:4], epochs=1, batch_size=4, progress=False)
    assert not _same(before, _weights(tl_adapter))
    assert not tl_adapter.model.training


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_train_model_learns(tokenizer, tokens):
    examples = _repetitive(tokenizer)
    adapter = build_small_model(tokenizer, n_layers=1, d_model=32, n_heads=4, n_ctx=64, seed=0)
    batch = collate(examples, adapter.pad_token_id)
    with torch.no_grad():
        before = adapter.per_example_loss(batch, tokens=tokens).mean().item()
    losses = train_model(adapter, examples, epochs=12, lr=1e-2, batch_size=8, tokens=tokens, seed=0, progress=False)
    with torch.no_grad():
        after = adapter.per_example_loss(batch, tokens=tokens).mean().item()
    assert len(losses) == 12 * 2
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < 0.5 * before, (before, after)
    assert sum(losses[-2:]) < 0.5 * sum(losses[:2])


def test_train_tokens_all_differs_from_response(tokenizer, tokenized):
    results = {}
    for tokens in ("response", "all"):
        adapter = build_small_model(tokenizer, n_layers=1, d_model=32, n_heads=4, n_ctx=64, seed=0)
        results[tokens] = train_model(adapter, tokenized, epochs=1, batch_size=6, tokens=tokens, progress=False)
    assert results["response"] != results["all"]
    with pytest.raises(ValueError, match="tokens"):
        train_model(build_small_model(tokenizer, n_layers=1, d_model=32, n_heads=4, seed=0), tokenized, tokens="bad",
                    progress=False)


def test_train_model_needs_examples(tl_adapter):
    with pytest.raises(ValueError, match="at least one example"):
        train_model(tl_adapter, [], progress=False)


def test_seed_everything():
    seed_everything(5)
    a = (random.random(), torch.rand(3))
    seed_everything(5)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    seed_everything(6)
    assert random.random() != a[0]
