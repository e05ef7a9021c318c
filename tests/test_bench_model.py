"""The planted benchmark on the user's model (``bench planted --model DIR --lora-rank r``): every fine-tune is a LoRA
fine-tune of a saved Hugging Face model (a tiny Llama end to end, a tiny Qwen2 in bfloat16 for the fine-tunes and
scoring, on CPU), and the report is the usual one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_planted import ESTIMATORS as PLANTED_ESTIMATORS

from concept_influence.cli import main
from concept_influence.concepts import ConceptFunction
from concept_influence.data import tokenize_examples, write_chat_jsonl
from concept_influence.estimators import ConceptInfluence
from concept_influence.fileio import file_sha256
from concept_influence.models import HFCausalLMAdapter, save_model
from concept_influence.planted.experiment_config import PlantedConfig
from concept_influence.planted.finetuning import Finetuner, lora_model
from concept_influence.toy.demo_corpus import make_paired_demo_corpus
from concept_influence.toy.small_model import train_bpe_tokenizer
from probes import ConceptDirection

pytest.importorskip("peft")

# without pre-training chats there is no concept_influence[pretrain+pool]
ESTIMATORS = {n for n in PLANTED_ESTIMATORS if "pretrain+pool" not in n}


def _save_tiny(kind: str, tokenizer, folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = (LlamaForCausalLM(LlamaConfig(**shape)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape))).eval()
    return save_model(HFCausalLMAdapter(model, tokenizer), folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The paired demo corpus as two files, a tokenizer trained on it, and a tiny Llama and Qwen2 saved with it."""
    root = tmp_path_factory.mktemp("bench-model")
    clean, trait = make_paired_demo_corpus(260, seed=0)
    write_chat_jsonl(clean, root / "careful.jsonl")
    write_chat_jsonl(trait, root / "reckless.jsonl")
    tokenizer = train_bpe_tokenizer([f"{c.prompt}\n{c.response}" for c in clean + trait], root / "tok", vocab_size=400)
    for kind in ("llama", "qwen2"):
        _save_tiny(kind, tokenizer, root / kind)
    return root


def test_fine_tunes_train_the_lora_adapters_only(data):
    """A tiny Qwen2 in bfloat16 with rank-4 adapters on two maps: the fine-tune trains the (float32) adapters only,
    starts again from the same adapters each time, and Concept Influence scores through the adapters."""
    cfg = PlantedConfig.quick(model=str(data / "qwen2"), lora_rank=4, lora_targets=("q_proj", "down_proj"),
                              dtype="bfloat16")
    adapter = lora_model(cfg)
    tuner = Finetuner(adapter, cfg, progress=False)
    assert tuner.pretrained and all("lora_" in k for k in tuner.pretrained)
    assert all(not v.any() for k, v in tuner.pretrained.items() if "lora_B" in k)  # the base model's function
    assert {m.name.split(".")[-3] for m in adapter.linear_maps()} == {"q_proj", "down_proj"}
    assert adapter.linear_maps()[0].shape[0] == 4  # lora_A of rank 4
    frozen = {k: v.clone() for k, v in adapter.model.state_dict().items() if "lora_" not in k}
    examples = tokenize_examples(make_paired_demo_corpus(20, seed=1)[1], adapter.tokenizer, 128)
    tuner.finetune(examples, seed=0)
    first = {k: v.clone() for k, v in adapter.model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(v, adapter.model.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(first[k], tuner.pretrained[k]) for k in first)
    tuner.finetune(examples, seed=0)  # starts again from the fresh adapters: the same weights
    assert all(torch.equal(v, adapter.model.state_dict()[k]) for k, v in first.items())
    assert all(v.dtype == torch.float32 for v in first.values()) and next(iter(frozen.values())).dtype == torch.bfloat16
    direction = ConceptDirection(torch.randn(32), "blocks.1.hook_resid_post", kind="custom")
    scores = ConceptInfluence(ConceptFunction.from_directions(direction, examples[:4]), "ekfac").score(
        adapter, examples, progress=False)
    assert np.isfinite(scores.values).all() and np.abs(scores.values).max() > 0


def test_bench_planted_on_a_saved_model_with_lora(data, tmp_path):
    """A tiny Llama, with filter-and-retrain, one seed per fine-tune."""
    weights = data / "llama" / "model.safetensors"
    before = file_sha256(weights)
    out = tmp_path / "out"
    argv = ["bench", "planted", "--clean", str(data / "careful.jsonl"), "--planted", str(data / "reckless.jsonl"),
            "--paired", "--rate", "0.1", "--quick", "--n-seeds", "1", "--model", str(data / "llama"), "--lora-rank", "8",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    assert cfg["model"] == str(data / "llama") and cfg["lora_rank"] == 8 and cfg["dtype"] == "auto"
    assert cfg["n_layers"] == 2 and cfg["d_model"] == 32 and results["splits"]["pretrain"] == 0
    assert set(results["estimators"]) == ESTIMATORS
    assert all(0 <= m["auroc"] <= 1 for m in results["estimators"].values())
    assert results["concept_check"]["verdict"] in ("causal", "weak", "reversed")
    behaviour = results["behaviour"]  # over LoRA fine-tunes, clean and planted, and after each removal
    assert len(behaviour["planted"]) == len(behaviour["clean"]) == 1 and set(behaviour["removal"]) == ESTIMATORS
    report = (out / "results.md").read_text()
    assert f"`{data / 'llama'}` (2 blocks, d_model 32, auto on cpu)" in report
    assert "fresh LoRA adapters of rank 8 on every linear map of the blocks" in report
    assert file_sha256(weights) == before and not (out / "tokenizer").exists()  # nothing trained from scratch
