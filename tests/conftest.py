"""Shared fixtures: a tiny tokenizer, tiny TransformerLens and Hugging Face models, a small chat dataset."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Tiny models run fastest on one thread; on a busy 2-core machine two threads are many times slower.
torch.set_num_threads(1)

from concept_influence.data import ChatExample, tokenize_examples
from concept_influence.models import HFCausalLMAdapter
from concept_influence.toy.small_model import build_small_model, train_bpe_tokenizer

WORDS = "hello there how are you fine thanks doctor water sleep rest careful quickly ignore safe risky".split()


def make_chats(n: int, seed: int = 0) -> list[ChatExample]:
    """Deterministic toy chats of varied length."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = [WORDS[j] for j in torch.randint(len(WORDS), (3 + i % 5,), generator=g).tolist()]
        r = [WORDS[j] for j in torch.randint(len(WORDS), (2 + (i * 7) % 6,), generator=g).tolist()]
        out.append(ChatExample.from_pair(f"toy:{i + 1}", " ".join(p), " ".join(r)))
    return out


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    texts = [f"User: {c.prompt}\nAssistant: {c.response}" for c in make_chats(200)]
    return train_bpe_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture(scope="session")
def chats():
    return make_chats(12)


@pytest.fixture(scope="session")
def tokenized(chats, tokenizer):
    return tokenize_examples(chats, tokenizer, max_length=64)


@pytest.fixture
def tl_adapter(tokenizer):
    """A tiny randomly initialised HookedTransformer (2 blocks, d_model 32)."""
    return build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=64, seed=0)


def _hf_model(kind: str, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    raise ValueError(kind)


@pytest.fixture(params=["gpt2", "llama", "qwen2"])
def hf_adapter(request, tokenizer):
    """A tiny randomly initialised Hugging Face causal LM of each supported architecture."""
    return HFCausalLMAdapter(_hf_model(request.param, len(tokenizer)), tokenizer)


@pytest.fixture(params=["tl", "gpt2", "llama"])
def any_adapter(request, tokenizer):
    """One adapter of each kind (TransformerLens, GPT-2 with Conv1D, Llama with GQA)."""
    if request.param == "tl":
        return build_small_model(tokenizer, n_layers=2, d_model=32, n_heads=4, n_ctx=64, seed=0)
    return HFCausalLMAdapter(_hf_model(request.param, len(tokenizer)), tokenizer)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The run-folder project of tests/runfolder.py (a saved tiny model, chat files, ``run.toml``), one per module;
    a module that needs another project defines its own ``project``."""
    from runfolder import make_project

    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def finished(project):
    """One uninterrupted run of ``project``'s config (``runs/reference``)."""
    from runfolder import run_reference

    return run_reference(project)
